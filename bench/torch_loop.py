"""Variant (c): a plain PyTorch per-example loop of the same algorithm on the same weights.

A transformers ``LlamaForCausalLM`` / ``GPT2LMHeadModel`` is built from the recovery_jax params
(``to_hf``), and the paper's PyTorch code is followed: forward hooks on the decoder layers (frozen:
a pre-hook overwriting the residual with ``x_def + delta``; live: clamp -> add delta -> capture on the
layer output), full logits, ``torch.optim.Adam``, encoder-null gradient projection with a ridge
``torch.linalg.solve`` every step, or the Jacobian sketch (one ``autograd.grad`` per probe through the
retained graph, Gram-Schmidt), then the Frobenius clip. Only imported when torch is installed.
"""

from __future__ import annotations

import time

import jax
import numpy as np
import torch

from bench.problems import Workload
from recovery_jax.models import sites as sites_lib
from recovery_jax.models.config import ModelConfig


TORCH_SEED = 0  # the Gaussian probes of the Jacobian sketch (torch's generator, not JAX's keys)


def _t(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32))


def to_hf(params, cfg: ModelConfig):
  """transformers model (eval mode, frozen weights) computing the same function as ``params``."""
  import transformers as tf  # pylint: disable=import-outside-toplevel
  p = {k: v for k, v in params.items()}
  b = p["blocks"]
  D, H, K, E, F, L = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.n_layers
  sd = {}
  if cfg.family == "gpt2":
    hf_cfg = tf.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=D, n_layer=L, n_head=H,
                           n_inner=F, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                           bos_token_id=None, eos_token_id=None)
    model = tf.GPT2LMHeadModel(hf_cfg)
    a, m = b["attn"], b["mlp"]
    sd["transformer.wte.weight"] = _t(p["embed"]["W_E"])
    sd["transformer.wpe.weight"] = _t(p["pos_embed"]["W_pos"])
    for i in range(L):
      pre = f"transformer.h.{i}."
      sd[pre + "ln_1.weight"], sd[pre + "ln_1.bias"] = _t(b["ln1"]["w"][i]), _t(b["ln1"]["b"][i])
      sd[pre + "ln_2.weight"], sd[pre + "ln_2.bias"] = _t(b["ln2"]["w"][i]), _t(b["ln2"]["b"][i])
      sd[pre + "attn.c_attn.weight"] = _t(np.concatenate([np.asarray(a[n][i]).reshape(D, D)
                                                           for n in ("W_Q", "W_K", "W_V")], axis=1))
      sd[pre + "attn.c_attn.bias"] = _t(np.concatenate([np.asarray(a[n][i]).reshape(-1)
                                                         for n in ("b_Q", "b_K", "b_V")]))
      sd[pre + "attn.c_proj.weight"] = _t(np.asarray(a["W_O"][i]).reshape(D, D))
      sd[pre + "attn.c_proj.bias"] = _t(a["b_O"][i])
      sd[pre + "mlp.c_fc.weight"], sd[pre + "mlp.c_fc.bias"] = _t(m["W_in"][i]), _t(m["b_in"][i])
      sd[pre + "mlp.c_proj.weight"], sd[pre + "mlp.c_proj.bias"] = _t(m["W_out"][i]), _t(m["b_out"][i])
    sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"] = _t(p["ln_final"]["w"]), _t(p["ln_final"]["b"])
  elif cfg.family == "llama":
    hf_cfg = tf.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
                            num_attention_heads=H, num_key_value_heads=K, head_dim=E, rms_norm_eps=cfg.norm_eps,
                            rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, hidden_act=cfg.act,
                            max_position_embeddings=4096, attention_bias=False, mlp_bias=False)
    model = tf.LlamaForCausalLM(hf_cfg)
    a, m = b["attn"], b["mlp"]
    sd["model.embed_tokens.weight"] = _t(p["embed"]["W_E"])
    for i in range(L):
      pre = f"model.layers.{i}."
      sd[pre + "self_attn.q_proj.weight"] = _t(np.asarray(a["W_Q"][i]).reshape(D, H * E).T)
      sd[pre + "self_attn.k_proj.weight"] = _t(np.asarray(a["W_K"][i]).reshape(D, K * E).T)
      sd[pre + "self_attn.v_proj.weight"] = _t(np.asarray(a["W_V"][i]).reshape(D, K * E).T)
      sd[pre + "self_attn.o_proj.weight"] = _t(np.asarray(a["W_O"][i]).reshape(H * E, D).T)
      sd[pre + "mlp.gate_proj.weight"] = _t(np.asarray(m["W_gate"][i]).T)
      sd[pre + "mlp.up_proj.weight"] = _t(np.asarray(m["W_in"][i]).T)
      sd[pre + "mlp.down_proj.weight"] = _t(np.asarray(m["W_out"][i]).T)
      sd[pre + "input_layernorm.weight"] = _t(b["ln1"]["w"][i])
      sd[pre + "post_attention_layernorm.weight"] = _t(b["ln2"]["w"][i])
    sd["model.norm.weight"] = _t(p["ln_final"]["w"])
    if not cfg.tie_embeddings:
      sd["lm_head.weight"] = _t(np.asarray(p["unembed"]["W_U"]).T)
  else:
    raise ValueError(f"bench.torch_loop supports llama and gpt2 models, not {cfg.family!r}")
  missing, unexpected = model.load_state_dict(sd, strict=False)
  missing = [k for k in missing if not k.endswith("lm_head.weight") and "attn.bias" not in k]
  if missing or unexpected:
    raise ValueError(f"to_hf: missing {missing}, unexpected {unexpected}")
  if cfg.tie_embeddings:
    model.tie_weights()
  model.eval()
  for q in model.parameters():
    q.requires_grad_(False)
  return model


def _layers(model):
  return model.transformer.h if hasattr(model, "transformer") else model.model.layers


SUPPORTED = dict(objectives=("logit_diff", "teacher_forced"), projections=("none", "encoder", "jacobian"))


def check_supported(wl: Workload) -> None:
  """Raises where the workload asks for more than this loop implements (it follows the reference's
  hooks: a standard ReLU SAE clamp with the error term kept; frozen: one ``hook_resid_pre`` delta
  site; live: ``hook_resid_post`` delta sites, one clamp at each)."""
  spec, r = wl.spec, wl.spec.config
  why = []
  if spec.objective.kind not in SUPPORTED["objectives"]:
    why.append(f"objective {spec.objective.kind!r}")
  if r.projection not in SUPPORTED["projections"] or r.checkpoint != "final" or r.projects_params:
    why.append(f"projection {r.projection!r} / checkpoint {r.checkpoint!r} / project_params")
  o = spec.objective
  if o.kind == "teacher_forced" and (o.w_prefix or o.w_first or o.w_anti or o.w_margin):
    why.append("teacher-forced terms other than w_ans")
  if (r.lambda_decode or r.lambda_delta or r.correction_steps
      or (r.lambda_act and (not r.is_jacobian or r.drift_penalty != "relative_mse"))):
    why.append("penalties other than a Jacobian-mode lambda_act with relative_mse, or correction steps")
  for c in wl.clamps:
    if (c.sae_cfg.architecture != "standard" or c.sae_cfg.normalize_activations != "none"
        or c.spec.error_term != "keep" or c.spec.masked_positions):
      why.append(f"clamp at {c.site!r} ({c.sae_cfg.architecture}, error_term={c.spec.error_term})")
  hook = "hook_resid_pre" if spec.semantics == "frozen" else "hook_resid_post"
  if (tuple(c.site for c in wl.clamps) != spec.delta_sites or any(not s.endswith(hook) for s in spec.delta_sites)
      or (spec.semantics == "frozen" and len(spec.delta_sites) != 1)):
    why.append(f"{spec.semantics} delta sites {spec.delta_sites} with clamps at {[c.site for c in wl.clamps]}")
  if not bool(np.all(np.asarray(wl.problems.delta_valid))) or not bool(np.all(np.asarray(wl.problems.monitor_valid))):
    why.append("masked delta or monitor columns")
  if why:
    raise ValueError("bench.torch_loop does not implement: " + "; ".join(why))


class TorchLoop:
  """Per-example PyTorch recovery of a ``Workload`` (variant c)."""

  def __init__(self, params, wl: Workload, threads: int | None = None, device: str = "cpu"):
    """``device``: a torch device ("cpu", "cuda"); on CUDA, float32 matmuls may use TF32, as JAX's
    default precision does there, and step times are taken after ``torch.cuda.synchronize``."""
    check_supported(wl)
    if threads:
      torch.set_num_threads(threads)
    self.dev = torch.device(device)
    if self.dev.type == "cuda":
      torch.backends.cuda.matmul.allow_tf32 = True
    self.cfg, self.wl, self.spec, self.rcfg = wl.spec.model_cfg, wl, wl.spec, wl.spec.config
    self.model = to_hf(params, self.cfg).to(self.dev)
    pbs = jax.tree.map(lambda a: np.asarray(a)[:, 0], wl.problems)  # [N, ...]: one row per example
    on = lambda a, dt=np.int64: torch.from_numpy(np.array(a, dt)).to(self.dev)
    self.tokens = on(pbs.tokens)
    self.targets = pbs.targets
    self.cols = {k: on(getattr(pbs, k + "_cols")) for k in ("delta", "readout", "monitor")}
    self.saes = [{k: on(v, np.float32) for k, v in c.sae.items()} for c in wl.clamps]
    self.b_in = [c.sae_cfg.apply_b_dec_to_input for c in wl.clamps]
    self.idx = [on(c.params.feature_idx) for c in wl.clamps]
    self.fmask = [on(c.mask, bool) for c in wl.clamps]
    self.values = [float(c.params.value) for c in wl.clamps]
    self.enc = [on(c.encoder_columns(), np.float32) for c in wl.clamps]  # masked [d, K]
    self.dec = [on(c.decoder_rows(), np.float32) for c in wl.clamps]  # masked [K, d]
    self.layers = [sites_lib.parse_site(s).layer for s in self.spec.delta_sites]

  # --- SAE pieces (standard ReLU SAE, sparse clamp) -------------------------------------------

  def _z(self, j: int, x: torch.Tensor) -> torch.Tensor:
    s = self.saes[j]
    x = x - s["b_dec"] if self.b_in[j] else x
    return torch.relu(x @ s["W_enc"][:, self.idx[j]] + s["b_enc"][self.idx[j]])

  def _clamp(self, j: int, x: torch.Tensor) -> torch.Tensor:
    spec, z = self.wl.clamps[j].spec, self._z(j, x)
    if spec.mode == "zero":
      new = torch.zeros_like(z)
    else:
      new = z * self.values[j] if spec.mode == "multiply" else torch.full_like(z, self.values[j])
    if spec.positive_only:
      new = torch.where(z > 0, new, z)
    dz = torch.where(self.fmask[j], new - z, torch.zeros_like(z))
    return x + dz @ self.dec[j]

  # --- hooks ----------------------------------------------------------------------------------

  def _forward(self, i: int, delta, x_def, captures):
    """Full forward of example i with the workload's hooks; returns logits [1, T, V]."""
    cols = self.cols["delta"][i]
    handles = []
    layers = _layers(self.model)
    if self.spec.semantics == "frozen":
      def pre_hook(module, args, kwargs):
        x = x_def.clone()
        x[:, cols] = x[:, cols] + delta[0]
        if args:
          return (x,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}
      handles.append(layers[self.layers[0]].register_forward_pre_hook(pre_hook, with_kwargs=True))
    else:
      for j, layer in enumerate(self.layers):
        def hook(module, args, output, j=j):
          h = output[0] if isinstance(output, tuple) else output
          h = self._clamp(j, h)
          pad = torch.zeros_like(h)
          pad[:, cols] = delta[j]
          h = h + pad
          captures[j] = h
          return (h,) + tuple(output[1:]) if isinstance(output, tuple) else h
        handles.append(layers[layer].register_forward_hook(hook))
    try:
      return self.model(self.tokens[i:i + 1]).logits
    finally:
      for h in handles:
        h.remove()

  def _resid_pre(self, ids, layer: int) -> torch.Tensor:
    got = {}

    def grab(module, args, kwargs):
      got["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()
      raise _Stop()

    h = _layers(self.model)[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
      self.model(ids)
    except _Stop:
      pass
    finally:
      h.remove()
    return got["x"]

  # --- objective and drift --------------------------------------------------------------------

  def _objective(self, logits, i: int) -> torch.Tensor:
    obj = self.spec.objective
    lo = logits[0, self.cols["readout"][i]].float()
    if obj.kind == "logit_diff":
      return lo[0, int(self.targets["pos"][i])] - lo[0, int(self.targets["neg"][i])]
    nxt = torch.from_numpy(np.array(self.targets["next_tokens"][i], np.int64)).to(self.dev)
    lp = torch.log_softmax(lo, dim=-1).gather(-1, nxt[:, None])[:, 0]
    return obj.w_ans * lp.mean()

  def _feats(self, captures, i: int) -> list[torch.Tensor]:
    return [self._z(j, captures[j][0, self.cols["monitor"][i]]) for j in range(len(self.layers))]

  def _act_loss(self, feats, refs) -> torch.Tensor:
    """relative_mse averaged over sites (masked features)."""
    total = 0.0
    for c, r, m in zip(feats, refs, self.fmask):
      mf = m.float()[None].expand_as(c)
      nn = mf.sum()
      d2 = ((c - r) ** 2 * mf).sum()
      r2 = ((r ** 2) * mf).sum().detach()
      total = total + (d2 / nn) / (r2 / nn + self.rcfg.act_loss_eps)
    return total / len(feats)

  # --- recovery -------------------------------------------------------------------------------

  def recover(self, i: int, steps: int | None = None, timing: dict | None = None) -> float:
    """Whole recovery of example i (final objective); ``timing`` accumulates "fixed" / "steps" seconds."""
    r = self.rcfg
    steps = r.steps if steps is None else steps
    timing = {} if timing is None else timing
    t0 = time.perf_counter()
    x_def = None
    if self.spec.semantics == "frozen":
      x_def = self._clamp(0, self._resid_pre(self.tokens[i:i + 1], self.layers[0]))
    delta = torch.zeros(len(self.layers), self.cols["delta"].shape[1], self.cfg.d_model, requires_grad=True,
                        device=self.dev)
    refs = None
    if r.is_jacobian or r.lambda_act:
      with torch.no_grad():
        caps = {}
        self._forward(i, delta, x_def, caps)
        refs = self._feats(caps, i)
    opt = torch.optim.Adam([delta], lr=r.lr, betas=(r.b1, r.b2), eps=r.eps)
    gen = torch.Generator(self.dev).manual_seed(TORCH_SEED)
    t1 = time.perf_counter()
    step_times = timing.setdefault("step_times", [])
    self._sync()
    for _ in range(steps):
      ts = time.perf_counter()
      caps = {}
      logits = self._forward(i, delta, x_def, caps)
      obj = self._objective(logits, i)
      if r.is_jacobian:
        feats = self._feats(caps, i)
        pen = r.lambda_act * self._act_loss(feats, refs)
        g = self._jacobian_grad(delta, obj, pen, feats, refs, gen)
      else:
        opt.zero_grad()
        (-obj).backward()
        g = delta.grad
        if r.projection == "encoder":
          g = torch.stack([self._encoder_null(self.enc[j], g[j], r.ridge) for j in range(len(self.layers))])
      delta.grad = g
      opt.step()
      with torch.no_grad():
        nrm = delta.norm()
        if nrm > r.budget:
          delta.mul_(r.budget / (nrm + 1e-8))
      self._sync()
      step_times.append(time.perf_counter() - ts)
    t2 = time.perf_counter()
    with torch.no_grad():
      obj = float(self._objective(self._forward(i, delta, x_def, {}), i))
    t3 = time.perf_counter()
    timing["fixed"] = timing.get("fixed", 0.0) + (t1 - t0) + (t3 - t2)
    timing["steps"] = timing.get("steps", 0.0) + (t2 - t1)
    return obj

  def _sync(self):
    if self.dev.type == "cuda":
      torch.cuda.synchronize(self.dev)

  @staticmethod
  def _encoder_null(a: torch.Tensor, g: torch.Tensor, ridge: float) -> torch.Tensor:
    """Reference ``project_to_encoder_null``: g - A (A^T A + ridge I)^-1 A^T g, rows of g."""
    gram = a.T @ a + ridge * torch.eye(a.shape[1], device=a.device)
    coeff = torch.linalg.solve(gram, a.T @ g.T)
    return g - (a @ coeff).T

  def _jacobian_grad(self, delta, obj, pen, feats, refs, gen) -> torch.Tensor:
    """Reference ``build_jacobian_basis`` + projection: P(grad(-obj)) + grad(pen)."""
    r = self.rcfg
    z = torch.cat([f.reshape(-1) for f in feats])
    rr = torch.cat([x.reshape(-1) for x in refs])
    probes = []
    d = (z - rr).detach()
    if r.jacobian_drift_probe and d.norm() > 1e-8:
      probes.append(d / d.norm())
    for _ in range(r.jacobian_probes):
      v = torch.randn(z.shape[0], generator=gen, device=z.device)
      probes.append(v / v.norm())
    basis = []
    for p in probes:
      (q,) = torch.autograd.grad(z, delta, grad_outputs=p, retain_graph=True)
      q = q.reshape(-1)
      for b in basis:
        q = q - (q @ b) * b
      if q.norm() > r.jacobian_tol:
        basis.append(q / q.norm())
    (g_obj,) = torch.autograd.grad(-obj, delta, retain_graph=True)
    (g_pen,) = torch.autograd.grad(pen, delta)
    g = g_obj.reshape(-1)
    for b in basis:
      g = g - (g @ b) * b
    return g.reshape(delta.shape) + g_pen

  def calibrate_threads(self, candidates=(1, None), reps: int = 2) -> int:
    """Sets torch's intra-op thread count to the fastest of ``candidates`` (None: all cores) on a
    full forward + backward; OpenMP barriers degrade badly on a shared, oversubscribed CPU."""
    import os  # pylint: disable=import-outside-toplevel
    if self.dev.type != "cpu":
      return torch.get_num_threads()
    ids = self.tokens[:1]
    best, best_t = 1, float("inf")
    for c in candidates:
      n = c or os.cpu_count() or 1
      torch.set_num_threads(n)
      x = torch.zeros(1, requires_grad=True, device=self.dev)

      def run():
        h = {}
        def hook(module, args, output):
          return (output[0] + x,) + tuple(output[1:]) if isinstance(output, tuple) else output + x
        h["h"] = _layers(self.model)[0].register_forward_hook(hook)
        try:
          self.model(ids).logits[0, -1, 0].backward()
        finally:
          h["h"].remove()

      run()
      t0 = time.perf_counter()
      for _ in range(reps):
        run()
      dt = time.perf_counter() - t0
      if dt < best_t:
        best, best_t = n, dt
    torch.set_num_threads(best)
    return best

  def logits_parity(self, jax_logits: np.ndarray, i: int = 0) -> float:
    """Max |logit difference| against recovery_jax's forward on example i (no edits)."""
    with torch.no_grad():
      out = self.model(self.tokens[i:i + 1]).logits[0].cpu().numpy()
    return float(np.max(np.abs(out - jax_logits)))

  def run(self, n: int, steps: int | None = None) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    timing = {}
    objs = [self.recover(i, steps, timing) for i in range(n)]
    return {"objectives": objs, "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "fixed_s": timing["fixed"], "steps_s": timing["steps"], "step_times": timing["step_times"]}


class _Stop(Exception):
  pass
