"""Reading and writing model folders: atomic writes, lazy (block by block) models, streamed runs."""
