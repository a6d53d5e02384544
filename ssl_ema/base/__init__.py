"""Base utilities every layer may use: errors, configuration, atomic files, the machine."""
