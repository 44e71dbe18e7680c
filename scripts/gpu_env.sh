# Sourced by the GPU scripts (gpu_check.sh, gpu_bench.sh, gpu_train_video_large.sh) from the repo root: the
# GPU machine has torch but not diffusers (nor cache-dit, tomesd, DeepCache), so the wheels of a .whl folder in
# the repo root, when there is one, are installed offline without dependencies into /tmp/site; this checkout's
# accel comes first on PYTHONPATH.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
