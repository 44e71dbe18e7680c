"""``import accel.auto``: from here on, every diffusers pipeline this process calls is accelerated.

    # script.py
    import accel.auto
    ...                                   # unchanged diffusers code

    ACCEL_PRESET=fast python script.py    # or ACCEL_CONFIG=accel.yaml; ACCEL_STATS=0 for no stats

Each pipeline gets the preset (default ``balanced`` where defined, else ``off``) at its first call,
and ``accel: stats {json}`` lines go to stderr at exit. `accel run -- python script.py` does the
same without the import line. Details: `accel.zero_code`.
"""

from .zero_code import install

install()
