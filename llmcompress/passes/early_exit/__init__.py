"""The early-exit family: the `early-exit` pass (`early_exit.py`) finds a decoder graph's layers (`structure.py`),
prices the cascade from the graph's weights (`costs.py`) and cuts the decode graph into the pieces the backend
chooses between at run time (`split.py`)."""
