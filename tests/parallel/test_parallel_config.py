"""ParallelConfig validation and the checks `parallelize` makes before any work (single process)."""

import pytest

import accel
from accel.parallel import ParallelConfig, ParallelError, check, parallelize


def test_exports():
    assert accel.ParallelConfig is ParallelConfig and accel.parallelize is parallelize


@pytest.mark.parametrize("kwargs, message", [
    ({"cfg": 3}, "parallel.cfg: 3 is not allowed"),
    ({"sequence": 0}, "parallel.sequence: 0 is out of range"),
    ({"patch_mode": "fast"}, "parallel.patch_mode: 'fast' is not allowed; choose one of 'sync'"),
    ({"sequence": 2, "patch": 2}, "parallel.patch: 2 cannot be combined with sequence=2"),
    ({"patch_kv_fraction": 0.0}, "parallel.patch_kv_fraction: 0.0 is out of range"),
])
def test_bad_fields_name_field_value_and_allowed(kwargs, message):
    with pytest.raises(accel.ConfigError, match=message.replace("(", r"\(")):
        ParallelConfig(**kwargs)


def test_world_size_and_round_trip():
    c = ParallelConfig(cfg=2, sequence=4)
    assert c.world_size == 8 and c.enabled
    assert ParallelConfig.from_dict(c.to_dict()) == c
    assert ParallelConfig(patch=2, patch_mode="async").gn_mode == "corrected_async_gn"


def test_invalid_combinations_fail_before_any_work(tiny_cache):
    flux, sd15 = tiny_cache("flux"), tiny_cache("sd15")
    with pytest.raises(accel.ConfigError, match="does not divide the 2 attention heads"):
        check(flux, ParallelConfig(sequence=4))
    with pytest.raises(accel.ConfigError, match="sequence parallelism supports the DiT families"):
        check(sd15, ParallelConfig(sequence=2))
    with pytest.raises(accel.ConfigError, match="needs the pipeline"):
        check(sd15.unet, ParallelConfig(cfg=2))
    with pytest.raises(ParallelError, match="need 2 processes but this is a single process"):
        parallelize(sd15, ParallelConfig(cfg=2))
    assert "_accel_parallel" not in sd15.__dict__ and "_diffusers_hook" not in sd15.unet.__dict__

pytestmark = [pytest.mark.multiprocess]
