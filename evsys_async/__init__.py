"""evsys-async."""
