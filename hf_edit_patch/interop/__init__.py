"""Other formats: PEFT's SHiRA adapters (`peft.py`), read and written from a patch's data."""
