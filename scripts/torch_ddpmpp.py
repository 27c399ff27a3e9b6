"""A PyTorch DDPM++ (NCHW) to time beside the Flax one in the same run.

Only the DDPM++ configuration of score_sde's `NCSNpp` is built: BigGAN residual blocks
(nearest / 2x2-mean resampling, no FIR), sinusoidal time embedding, no progressive
pyramids, rescaled skips, conditional, swish, GroupNorm(min(C // 4, 32), eps 1e-6),
self-attention at `attn_resolutions`, residual dropout. The structure follows
`scorejax.models.ncsnpp` / `blocks` / `layers`; the modules sit in one `all_modules`
list in call order so that `state_dict()` has the reference's keys and shapes
(`all_modules.<i>.<name>`, plus the `sigmas` buffer) and its checkpoints load strictly.

Usage:
  python scripts/torch_ddpmpp.py --check        # golden output of tests/data/ddpmpp_small_*
  python scripts/torch_ddpmpp.py [--repeats 5]  # time forward / train step, small config
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[1]
DATA = ROOT / 'tests' / 'data'


def group_norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)


def positional_embedding(timesteps: torch.Tensor, dim: int, max_positions: int = 10000):
  """`[sin(t f), cos(t f)]`, `f_k = exp(-k log(max_positions) / (dim / 2 - 1))`, float32."""
  half = dim // 2
  step = np.float32(math.log(max_positions) / (half - 1))
  freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device) * -step)
  args = timesteps.float()[:, None] * freqs[None, :]
  emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
  return F.pad(emb, (0, 1)) if dim % 2 else emb


class NIN(nn.Module):
  """Per-pixel linear map of the channels, `W [C_in, units]`, `b [units]`."""

  def __init__(self, in_ch: int, units: int):
    super().__init__()
    self.W = nn.Parameter(torch.zeros(in_ch, units))
    self.b = nn.Parameter(torch.zeros(units))

  def forward(self, x):  # [B, C, H, W]
    return torch.einsum('bchw,cd->bdhw', x, self.W) + self.b[None, :, None, None]


class AttnBlockpp(nn.Module):
  """One-head self-attention over all positions, rescaled residual."""

  def __init__(self, channels: int):
    super().__init__()
    self.GroupNorm_0 = group_norm(channels)
    self.NIN_0, self.NIN_1, self.NIN_2, self.NIN_3 = (NIN(channels, channels) for _ in range(4))

  def forward(self, x):
    B, C, H, W = x.shape
    h = self.GroupNorm_0(x)
    q, k, v = (m(h).reshape(B, C, H * W) for m in (self.NIN_0, self.NIN_1, self.NIN_2))
    w = torch.softmax(torch.einsum('bci,bcj->bij', q, k) * (int(C) ** (-0.5)), dim=-1)
    h = torch.einsum('bij,bcj->bci', w, v).reshape(B, C, H, W)
    return (x + self.NIN_3(h)) / math.sqrt(2.0)


class ResnetBlockBigGANpp(nn.Module):
  """`GN, act, resample, conv, + Dense(act(temb)), GN, act, dropout, conv`; the skip is
  resampled too and gets a 1x1 `Conv_2` when channels change or the block resamples."""

  def __init__(self, act, in_ch: int, out_ch: int | None = None, temb_dim: int | None = None,
               up: bool = False, down: bool = False, dropout: float = 0.1):
    super().__init__()
    out_ch = out_ch or in_ch
    self.act, self.up, self.down = act, up, down
    self.GroupNorm_0 = group_norm(in_ch)
    self.Conv_0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    if temb_dim is not None:
      self.Dense_0 = nn.Linear(temb_dim, out_ch)
    self.GroupNorm_1 = group_norm(out_ch)
    self.Dropout_0 = nn.Dropout(dropout)
    self.Conv_1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
    if in_ch != out_ch or up or down:
      self.Conv_2 = nn.Conv2d(in_ch, out_ch, 1)

  def _resample(self, x):
    if self.up:
      return F.interpolate(x, scale_factor=2, mode='nearest')
    if self.down:
      return F.avg_pool2d(x, 2)
    return x

  def forward(self, x, temb=None):
    h = self.act(self.GroupNorm_0(x))
    h, x = self._resample(h), self._resample(x)
    h = self.Conv_0(h)
    if temb is not None:
      h = h + self.Dense_0(self.act(temb))[:, :, None, None]
    h = self.Dropout_0(self.act(self.GroupNorm_1(h)))
    h = self.Conv_1(h)
    if hasattr(self, 'Conv_2'):
      x = self.Conv_2(x)
    return (x + h) / math.sqrt(2.0)


class DDPMpp(nn.Module):
  """DDPM++ score network `[B, C, H, W], [B] -> [B, C, H, W]`; labels are 999 t (VP)."""

  def __init__(self, config: dict):
    super().__init__()
    m, data = config['model'], config['data']
    expected = dict(resblock_type='biggan', embedding_type='positional', fir=False,
                    progressive='none', progressive_input='none', skip_rescale=True,
                    resamp_with_conv=True, conditional=True, nonlinearity='swish')
    wrong = {k: m.get(k) for k, v in expected.items() if m.get(k) != v}
    if wrong or m.get('scale_by_sigma'):
      raise ValueError(f'only the DDPM++ configuration is implemented; got {wrong}')
    self.act = F.silu
    self.nf, self.centered = m['nf'], data['centered']
    self.ch_mult, self.num_res_blocks = tuple(m['ch_mult']), m['num_res_blocks']
    self.attn_resolutions = tuple(m['attn_resolutions'])
    sigmas = np.exp(np.linspace(np.log(m['sigma_max']), np.log(m['sigma_min']), m['num_scales']))
    self.register_buffer('sigmas', torch.tensor(sigmas))

    nf, temb_dim, channels = self.nf, self.nf * 4, data['num_channels']

    def resblock(in_ch, out_ch=None, **kw):
      return ResnetBlockBigGANpp(self.act, in_ch, out_ch, temb_dim, dropout=m['dropout'], **kw)

    modules = [nn.Linear(nf, temb_dim), nn.Linear(temb_dim, temb_dim),
               nn.Conv2d(channels, nf, 3, padding=1)]
    hs_c, in_ch, res = [nf], nf, data['image_size']
    for i_level, mult in enumerate(self.ch_mult):
      for _ in range(self.num_res_blocks):
        modules.append(resblock(in_ch, nf * mult))
        in_ch = nf * mult
        if res in self.attn_resolutions:
          modules.append(AttnBlockpp(in_ch))
        hs_c.append(in_ch)
      if i_level != len(self.ch_mult) - 1:
        modules.append(resblock(in_ch, down=True))
        res //= 2
        hs_c.append(in_ch)
    modules += [resblock(in_ch), AttnBlockpp(in_ch), resblock(in_ch)]
    for i_level in reversed(range(len(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        modules.append(resblock(in_ch + hs_c.pop(), nf * self.ch_mult[i_level]))
        in_ch = nf * self.ch_mult[i_level]
      if res in self.attn_resolutions:
        modules.append(AttnBlockpp(in_ch))
      if i_level != 0:
        modules.append(resblock(in_ch, up=True))
        res *= 2
    assert not hs_c, 'unconsumed skip connections'
    modules += [group_norm(in_ch), nn.Conv2d(in_ch, channels, 3, padding=1)]
    self.all_modules = nn.ModuleList(modules)

  def forward(self, x, labels):
    modules = iter(self.all_modules)
    temb = positional_embedding(labels, self.nf)
    temb = next(modules)(temb)
    temb = next(modules)(self.act(temb))
    if not self.centered:
      x = 2 * x - 1.0

    hs = [next(modules)(x)]
    for i_level in range(len(self.ch_mult)):
      for _ in range(self.num_res_blocks):
        h = next(modules)(hs[-1], temb)
        if h.shape[-1] in self.attn_resolutions:
          h = next(modules)(h)
        hs.append(h)
      if i_level != len(self.ch_mult) - 1:
        hs.append(next(modules)(hs[-1], temb))

    h = next(modules)(hs[-1], temb)
    h = next(modules)(h)
    h = next(modules)(h, temb)
    for i_level in reversed(range(len(self.ch_mult))):
      for _ in range(self.num_res_blocks + 1):
        h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb)
      if h.shape[-1] in self.attn_resolutions:
        h = next(modules)(h)
      if i_level != 0:
        h = next(modules)(h, temb)

    h = self.act(next(modules)(h))
    h = next(modules)(h)
    assert next(modules, None) is None and not hs
    return h


def small_config() -> dict:
  return json.loads((DATA / 'ddpmpp_small_config.json').read_text())


def check(tolerance: float = 1e-4) -> float:
  """Loads the golden `ddpmpp_small` state_dict strictly and compares `model(x, labels)`
  with the reference output; returns the worst per-sample `max|err| / max|out|`.

  Raises:
    AssertionError: when a sample's error exceeds `tolerance * max|out|`.
  """
  model = DDPMpp(small_config()).eval()
  state = np.load(DATA / 'ddpmpp_small_state_dict.npz')
  model.load_state_dict({k: torch.from_numpy(state[k]) for k in state.files}, strict=True)
  io = np.load(DATA / 'ddpmpp_small_io.npz')
  with torch.no_grad():
    out = model(torch.from_numpy(io['x']), torch.from_numpy(io['labels'])).numpy()
  ref = io['out']
  err = np.abs(out - ref).reshape(len(ref), -1).max(axis=1)
  scale = np.abs(ref).reshape(len(ref), -1).max(axis=1)
  worst = float(np.max(err / scale))
  assert np.all(err <= tolerance * scale), f'DDPM++ mismatch: errors {err}, max|out| {scale}'
  return worst


def _random_model(config: dict, seed: int = 0) -> DDPMpp:
  torch.manual_seed(seed)
  model = DDPMpp(config)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.05 * torch.randn_like(p))
  return model


def _inputs(config: dict, batch: int):
  size, channels = config['data']['image_size'], config['data']['num_channels']
  x = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(1))
  return x, 999.0 * torch.linspace(0.1, 0.9, batch)


def _best_time(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(min(times))


def make_forward(config: dict, batch: int = 8):
  """A no-argument eval-mode, no-grad forward of a randomly initialised DDPM++ (2 threads)."""
  torch.set_num_threads(os.cpu_count() or 1)
  model = _random_model(config).eval()
  x, labels = _inputs(config, batch)

  def forward():
    with torch.no_grad():
      return model(x, labels)

  return forward


def make_train_step(config: dict, batch: int = 8):
  """A no-argument train step: score_sde's continuous VP-SDE loss (reduce_mean, dropout on),
  Adam 2e-4, grad-norm clipping 1.0, EMA 0.9999."""
  torch.set_num_threads(os.cpu_count() or 1)
  model = _random_model(config).train()
  params = list(model.parameters())
  ema = [p.detach().clone() for p in params]
  optimizer = torch.optim.Adam(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8)
  beta_0, beta_1 = config['model']['beta_min'], config['model']['beta_max']
  x, _ = _inputs(config, batch)
  x = 2 * x - 1  # centered data
  eps = 1e-5

  def step():
    t = torch.rand(batch) * (1 - eps) + eps
    z = torch.randn_like(x)
    log_mean_coeff = -0.25 * t ** 2 * (beta_1 - beta_0) - 0.5 * t * beta_0
    mean = torch.exp(log_mean_coeff)[:, None, None, None] * x
    std = torch.sqrt(1.0 - torch.exp(2.0 * log_mean_coeff))[:, None, None, None]
    score = -model(mean + std * z, 999.0 * t) / std
    loss = torch.mean(torch.mean(((score * std + z) ** 2).reshape(batch, -1), dim=1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
    optimizer.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, params, 1 - 0.9999)
    return loss

  return step


def time_forward(config: dict, batch: int = 8, repeats: int = 5) -> float:
  """Best of `repeats` `make_forward` calls (s) after a warm-up."""
  return _best_time(make_forward(config, batch), repeats)


def time_train_step(config: dict, batch: int = 8, repeats: int = 5) -> float:
  """Best of `repeats` `make_train_step` calls (s) after a warm-up."""
  return _best_time(make_train_step(config, batch), repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true', help='only the golden-output check')
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  print(f'check: worst max|err| / max|out| = {check():.2e}')
  if args.check:
    return
  config = small_config()
  print(f'ddpmpp_small batch 8: forward {time_forward(config, repeats=args.repeats):.3f} s, '
        f'train step {time_train_step(config, repeats=args.repeats):.3f} s')


if __name__ == '__main__':
  main()
