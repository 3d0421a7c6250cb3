"""Teachers loaded from outside speechkd: Hugging Face transformers SSL models (:mod:`speechkd.teachers.hf`)."""
