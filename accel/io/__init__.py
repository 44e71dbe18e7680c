"""What the front ends share below the engines: prompt files, output files and sidecars, and the
one "generate once" path (`accel.io.generate`)."""
