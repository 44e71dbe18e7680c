"""The benchmark scripts' clock is the library's (`accel.eval.clock`): one clock for `accel bench`,
`accel tune` and every script here."""

from accel.eval.clock import median, round_robin, timed  # noqa: F401
