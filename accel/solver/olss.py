"""OLSS (Optimal Linear Subspace Search): a scheduler fitted to one model from a few of its own full trajectories.

Every solver diffusers offers writes the next latent as a linear combination of the starting noise and the
model outputs so far, with coefficients fixed by hand (DDIM, DPM-Solver++, UniPC, flow Euler). OLSS fits them.
From K full runs of the pipeline as loaded (the teacher: its scheduler at its step count N), recorded at each
step (the latent x_i, the model output e_i the scheduler was given, the final latent), a student of M < N
steps is built in two parts:

- the path: which M of the teacher's N timesteps the student visits. Greedily, each step goes to the farthest
  teacher step its latent can be fitted at with a relative error under a bound, and the bound is bisected to
  the smallest that reaches the end in M steps or fewer (steps left over split the widest gaps);
- the coefficients: for student step i, ``x_{i+1} = wx_i * x_T + sum_j we_ij * e_j`` over the student's own
  model outputs e_0..e_i, by least squares (float64) against the teacher's latent at the path's next
  timestep, pooled over the K runs. A subsample of at most `FIT_ROWS` coordinates enters the fit (the
  unknowns are at most M + 1), so a 1024 px image or a video fits in seconds.

That fit sees the teacher's model outputs; the student gets its own, at latents already off the teacher's,
and the error grows along the run (on ref-dit at 8 of 20 steps the worst held-out prompt fell to 8 dB).
`refit_olss` fits each step again on the student's own outputs: the K fit calls run in one batch with the
student, and at step i the weights are solved so that the student's latent meets the teacher's at the path's
next timestep, given what the model returned at the student's latents so far (BENCHMARKS.md, "Fewer steps":
ref-dit at 12 of 20 steps, worst held-out prompt 25.0 -> 39.9 dB, against 30.2 for flow Euler).

Given every teacher step (M = N) the teacher's own update is in the subspace and the fit reproduces it: the
student's output equals the teacher's to float rounding. `OLSSScheduler` is a diffusers scheduler
(`SchedulerMixin` + `ConfigMixin`): ``save_pretrained``/``from_pretrained`` write and read one small
``scheduler_config.json``, and ``pipe.scheduler = OLSSScheduler.from_pretrained(folder)`` runs it in plain
diffusers code.
"""

from __future__ import annotations

import dataclasses

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

FIT_ROWS = 1 << 20  # coordinates entering a least-squares fit (sampled evenly)


class OLSSScheduler(SchedulerMixin, ConfigMixin):
    """A fitted scheduler: the student's timesteps and its linear coefficients (see the module's docstring).

    Args:
        timesteps: the teacher timesteps the student visits, in order.
        wx: per step, the weight of the starting latent.
        we: per step i, the weights of the model outputs 0..i (a list of i + 1 numbers).
        input_scales: per step, the factor the teacher's ``scale_model_input`` applied at that timestep.
        init_noise_sigma: the teacher's starting-noise scale (the pipeline multiplies its noise by it).
        sigmas: per step, the teacher's sigma at that timestep (pipelines that read ``scheduler.sigmas``, Wan).
        num_train_timesteps: the teacher's (pipelines read it from the config).
        teacher: what the fit was made from (scheduler class, steps, runs, errors), for the record.
    """

    order = 1
    _compatibles: list = []

    @register_to_config
    def __init__(self, timesteps: list | None = None, wx: list | None = None, we: list | None = None,
                 input_scales: list | None = None, init_noise_sigma: float = 1.0, sigmas: list | None = None,
                 num_train_timesteps: int = 1000, teacher: dict | None = None):
        timesteps = list(timesteps or [])
        if not (len(timesteps) == len(wx or []) == len(we or []) and all(len(w) == i + 1 for i, w in enumerate(we))):
            raise ValueError("OLSSScheduler: timesteps, wx and we must describe the same steps (we[i]: i + 1 weights)")
        self.init_noise_sigma = float(init_noise_sigma)
        self.num_inference_steps = len(timesteps)
        self.timesteps = torch.tensor(timesteps, dtype=torch.float32)
        self._wx = torch.tensor(wx, dtype=torch.float64)
        self._we = [torch.tensor(w, dtype=torch.float64) for w in we]
        self._scales = list(input_scales or [1.0] * len(timesteps))
        if sigmas is not None:
            self.sigmas = torch.tensor(list(sigmas) + [0.0], dtype=torch.float32)
        self._reset()

    def _reset(self) -> None:
        self._step = 0
        self._x_T = None
        self._outputs: list[torch.Tensor] = []

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu=None,
                      timesteps=None, **kwargs) -> None:
        """Start a run. The student's timesteps are fixed by the fit: a pipeline's own ``sigmas``/``mu``/
        ``timesteps`` (Flux and SD3 compute them from the step count) are not used, and a step count other
        than the fitted one is refused."""
        if num_inference_steps is not None and num_inference_steps != self.num_inference_steps:
            raise ValueError(f"OLSSScheduler was fitted for {self.num_inference_steps} steps, not "
                             f"{num_inference_steps}; call with num_inference_steps={self.num_inference_steps} "
                             "(solver.steps)")
        if device is not None:  # the weights go with the timesteps once, not with every step
            self.timesteps = self.timesteps.to(device)
            self._wx = self._wx.to(device)
            self._we = [w.to(device) for w in self._we]
        self._reset()

    def set_begin_index(self, begin_index: int = 0) -> None:
        if begin_index:
            raise ValueError("OLSSScheduler runs its fitted steps from the first (no img2img strength)")

    def scale_model_input(self, sample: torch.Tensor, timestep=None, *args, **kwargs) -> torch.Tensor:
        scale = self._scales[min(self._step, len(self._scales) - 1)]
        return sample if scale == 1.0 else sample * scale

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, return_dict: bool = True,
             **kwargs):
        if self._step >= self.num_inference_steps:
            raise RuntimeError("OLSSScheduler.step: more steps than fitted; call set_timesteps first")
        if self._step == 0:
            self._x_T = sample.to(torch.float64)
        self._outputs.append(model_output.to(torch.float64))
        i = self._step
        x = self._x_T * self._wx[i].to(sample.device)
        for e, w in zip(self._outputs, self._we[i].to(sample.device), strict=True):
            x = x + e * w
        self._step += 1
        if self._step == self.num_inference_steps:
            self._x_T, self._outputs = None, []  # the run is over: let the tensors go
        prev = x.to(sample.dtype)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def __len__(self) -> int:
        return self.num_inference_steps


@dataclasses.dataclass
class Trajectories:
    """K recorded runs of the teacher: ``x`` (K, N + 1, ...) latents, ``e`` (K, N, ...) model outputs (float32,
    on the CPU), the N ``timesteps``, the ``input_scales`` and ``init_noise_sigma`` of the teacher."""

    timesteps: list
    x: torch.Tensor
    e: torch.Tensor
    input_scales: list
    init_noise_sigma: float
    teacher: str
    sigmas: list | None = None
    num_train_timesteps: int = 1000

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def record_trajectories(pipe, calls) -> Trajectories:
    """Run ``calls`` (``(kwargs, seed)`` pairs) on ``pipe`` as loaded and record each step of its scheduler.

    Raises:
        ValueError: the pipeline's scheduler takes several model calls per step (Heun), or the runs differ in
            their timesteps (they must share the step count and size).
    """
    scheduler = pipe.scheduler
    if getattr(scheduler, "order", 1) != 1:
        raise ValueError(f"OLSS: {type(scheduler).__name__} makes {scheduler.order} model calls per step; fit from "
                         "a first-order or multistep scheduler")
    runs, scales, steps_seen, sigmas = [], {}, None, None
    current: dict = {}
    step_fn, scale_fn = scheduler.step, getattr(scheduler, "scale_model_input", None)

    def scale_model_input(sample, *args, **kwargs):
        out = scale_fn(sample, *args, **kwargs)
        i = len(current["x"])
        if i not in scales:
            denom = sample.double().norm()
            scales[i] = float(out.double().norm() / denom) if denom > 0 else 1.0
        return out

    def step(model_output, timestep, sample, *args, **kwargs):
        out = step_fn(model_output, timestep, sample, *args, **kwargs)
        current["x"].append(sample.detach().float().cpu())
        current["e"].append(model_output.detach().float().cpu())
        current["t"].append(float(timestep))
        current["last"] = (out[0] if isinstance(out, tuple) else out.prev_sample).detach().float().cpu()
        return out

    scheduler.step = step
    if scale_fn is not None:  # flow-matching schedulers have none: the model sees the latent as it is
        scheduler.scale_model_input = scale_model_input
    try:
        for kwargs, seed in calls:
            current.update(x=[], e=[], t=[], last=None)
            pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed))
            if steps_seen is not None and current["t"] != steps_seen:
                raise ValueError("OLSS: the recorded runs took different timesteps; give calls of one step count "
                                 "and size")
            steps_seen = list(current["t"])
            sigmas = getattr(scheduler, "sigmas", None)
            sigmas = [float(v) for v in sigmas[:len(steps_seen)]] if sigmas is not None and len(sigmas) >= len(
                steps_seen) else None
            runs.append((torch.stack(current["x"] + [current["last"]]), torch.stack(current["e"])))
    finally:
        for name in ("step", "scale_model_input"):  # the instance attributes go; the class's methods remain
            scheduler.__dict__.pop(name, None)
    if not runs:
        raise ValueError("OLSS: no run recorded")
    return Trajectories(steps_seen, torch.stack([r[0] for r in runs]), torch.stack([r[1] for r in runs]),
                        [scales.get(i, 1.0) for i in range(len(steps_seen))],
                        float(getattr(scheduler, "init_noise_sigma", 1.0)),
                        type(scheduler).__name__, sigmas,
                        int(dict(scheduler.config).get("num_train_timesteps", 1000)))


def _rows(traj: Trajectories) -> torch.Tensor | None:
    n = traj.x[:, 0].numel()
    if n <= FIT_ROWS:
        return None
    return torch.linspace(0, n - 1, FIT_ROWS).long()


def _flat(t: torch.Tensor, rows) -> torch.Tensor:
    """(K, ...) -> one float64 column over the K runs' coordinates (subsampled by ``rows``)."""
    flat = t.reshape(-1).double()
    return flat if rows is None else flat[rows]


def _fit(basis: list[torch.Tensor], target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Least-squares weights of ``basis`` columns for ``target`` and the relative squared error."""
    a = torch.stack(basis, dim=1)
    w = torch.linalg.lstsq(a, target.unsqueeze(1), driver="gelsd").solution.squeeze(1)
    residual = a @ w - target
    return w, float(residual.pow(2).mean() / target.pow(2).mean().clamp_min(1e-30))


def _path(traj: Trajectories, steps: int, x, e) -> list[int]:
    """The teacher step indices the student visits (see the module's docstring)."""
    n = traj.steps
    if steps >= n:
        return list(range(n))

    def greedy(bound: float) -> list[int] | None:
        path = [0]
        while True:
            lo, hi = path[-1] + 1, n  # n: the final latent
            basis = [x[path[-1]]] + [e[j] for j in path]
            while lo < hi:  # the farthest next index whose fit stays under the bound
                mid = (lo + hi + 1) // 2
                if _fit(basis, x[mid])[1] <= bound:
                    lo = mid
                else:
                    hi = mid - 1
            if lo == n:
                return path
            if len(path) == steps:
                return None
            path.append(lo)

    low, high = 0.0, 1.0
    best = greedy(high)
    for _ in range(24):
        mid = (low + high) / 2
        found = greedy(mid)
        if found is None:
            low = mid
        else:
            high, best = mid, found
    if best is None:  # no bound reaches the end: the evenly spaced path
        best = [round(i * n / steps) for i in range(steps)]
    while len(best) < steps:  # the bound reached the end in fewer steps: spend the rest on the widest gaps
        ends = best + [n]
        gap, i = max((ends[k + 1] - ends[k], k) for k in range(len(best)))
        best.insert(i + 1, ends[i] + gap // 2)
    return best


def fit_olss(traj: Trajectories, steps: int) -> OLSSScheduler:
    """The OLSS scheduler of ``steps`` steps for the recorded ``traj``."""
    if steps < 1:
        raise ValueError("OLSS: at least 1 step")
    rows = _rows(traj)
    x = [_flat(traj.x[:, i], rows) for i in range(traj.steps + 1)]
    e = [_flat(traj.e[:, i], rows) for i in range(traj.steps)]
    path = _path(traj, steps, x, e)
    wx, we, errors = [], [], []
    for i in range(len(path)):
        target = x[path[i + 1]] if i + 1 < len(path) else x[traj.steps]
        w, err = _fit([x[0]] + [e[k] for k in path[:i + 1]], target)
        wx.append(float(w[0]))
        we.append([float(v) for v in w[1:]])
        errors.append(err)
    return OLSSScheduler(timesteps=[traj.timesteps[j] for j in path], wx=wx, we=we,
                         input_scales=[traj.input_scales[j] for j in path], init_noise_sigma=traj.init_noise_sigma,
                         sigmas=[traj.sigmas[j] for j in path] if traj.sigmas else None,
                         num_train_timesteps=traj.num_train_timesteps,
                         teacher={"scheduler": traj.teacher, "steps": traj.steps, "runs": int(traj.x.shape[0]),
                                  "path": path, "relative_errors": [float(f"{v:.3g}") for v in errors]})


class _Refit(OLSSScheduler):
    """`refit_olss`'s scheduler: at each step it fits that step's weights on the model outputs of the run in flight
    (the student's own), against the teacher's latents (``targets``, over the coordinates ``rows``), then steps
    with them."""

    targets: list
    rows = None

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        i = self._step
        if i == 0:
            self._x_T = sample.to(torch.float64)
        basis = [_flat(self._x_T, self.rows)] + [_flat(e, self.rows) for e in self._outputs]
        basis.append(_flat(model_output, self.rows))
        w, err = _fit(basis, self.targets[i])
        self._wx[i] = w[0]
        self._we[i] = w[1:].to(self._wx.device)
        self.errors.append(err)
        return super().step(model_output, timestep, sample, *args, return_dict=return_dict, **kwargs)

    def fitted(self) -> OLSSScheduler:
        teacher = {**(self.config.teacher or {}), "refit": True,
                   "relative_errors": [float(f"{v:.3g}") for v in self.errors]}
        return OLSSScheduler.from_config({**self.config, "wx": self._wx.tolist(),
                                          "we": [w.tolist() for w in self._we], "teacher": teacher})


def refit_olss(pipe, calls, traj: Trajectories, sch: OLSSScheduler) -> OLSSScheduler:
    """``sch`` with each step's weights fitted again on the student's own model outputs: the recorded ``calls``
    (the ``(kwargs, seed)`` pairs `record_trajectories` ran, one prompt each) run in one batch with the student,
    and at step i the weights are fitted so that the student's latent meets the teacher's at the path's next
    timestep, given the model outputs the student actually got at its own (already approximate) latents. A fit on
    the teacher's outputs alone does not see that error grow; this one corrects it step by step. Costs one
    batched run of ``len(sch)`` steps."""
    kwargs = dict(calls[0][0])
    for key in ("prompt", "negative_prompt"):
        values = [c[0].get(key) for c in calls]
        if any(v is not None for v in values):
            kwargs[key] = values
    kwargs["num_inference_steps"] = len(sch)
    path = list(sch.config.teacher["path"]) + [traj.steps]
    rows = _rows(traj)
    targets = [_flat(traj.x[:, path[i + 1]], rows) for i in range(len(sch))]
    student = _Refit.from_config(sch.config)
    student.targets, student.rows, student.errors = targets, rows, []
    original = pipe.scheduler
    pipe.scheduler = student
    try:
        pipe(**kwargs, generator=[torch.Generator("cpu").manual_seed(seed) for _, seed in calls])
    finally:
        pipe.scheduler = original
    if student._step != len(sch):
        raise RuntimeError("OLSS refit: the batched run did not take the fitted steps")
    return student.fitted()

