#!/usr/bin/python3
"""PyTorch eager peer for loopserve benchmarks: a plain Ouro (LoopLM) forward with a KV cache.

The model follows DESIGN.md section 1: R loop steps over the shared decoder stack (sandwich
RMSNorm, RoPE, GQA attention, SwiGLU MLP), the final norm after every step, and the early exit
gate on the normed hidden state. Every step keeps its own KV cache per layer (cache index
step x layers + layer, as in the reference), so decode at full depth equals the "exact" goldens.

Weights come from the model folder's safetensors, parsed here with json + struct and
torch.frombuffer (Debian ships no `safetensors` package).

Modes:
  check --model DIR --golden FILE.safetensors [--golden-json FILE.json]
      compares step logits (1e-3) and gate logits (1e-4) with the goldens, and the greedy
      full-depth continuation (via the KV cache) with the golden ids; prints a JSON summary
      and exits 1 on a mismatch.
  bench --model DIR  (a JSON spec on stdin, see bench_main)
      prints one JSON object of timings.
"""

import argparse
import json
import math
import mmap
import os
import struct
import sys
import time

import torch

_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path):
    """Returns {name: tensor} viewing a private (copy-on-write) mapping of the file."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        # ACCESS_COPY gives a writable buffer (torch.frombuffer wants one) without touching the file.
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        count = math.prod(info["shape"])
        if count == 0:
            t = torch.empty(info["shape"], dtype=dtype)
        else:
            t = torch.frombuffer(buf, dtype=dtype, count=count, offset=base + start).reshape(info["shape"])
        if end - start != t.numel() * t.element_size():
            raise ValueError(f"{path}: tensor {name}: {end - start} bytes for shape {info['shape']}")
        out[name] = t
    return out


def read_model_tensors(model_dir):
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(read_safetensors(os.path.join(model_dir, name)))
    return tensors


class Ouro:
    """Ouro weights in one compute dtype, and the forward pass with per-step KV caches."""

    def __init__(self, model_dir, dtype=torch.float32):
        with open(os.path.join(model_dir, "config.json")) as f:
            cfg = json.load(f)
        self.cfg = cfg
        self.dtype = dtype
        self.hidden = cfg["hidden_size"]
        self.layers = cfg["num_hidden_layers"]
        self.heads = cfg["num_attention_heads"]
        self.kv_heads = cfg.get("num_key_value_heads") or self.heads
        self.head_dim = cfg.get("head_dim") or self.hidden // self.heads
        self.steps = cfg.get("total_ut_steps", 4)
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.theta = cfg.get("rope_theta", 10000.0)
        self.vocab = cfg["vocab_size"]
        t = read_model_tensors(model_dir)

        def w(name):
            return t[name].to(dtype).contiguous()

        self.embed = w("model.embed_tokens.weight")
        self.norm = w("model.norm.weight")
        self.lm_head = self.embed if cfg.get("tie_word_embeddings") and "lm_head.weight" not in t else w("lm_head.weight")
        self.gate_w = w("model.early_exit_gate.weight")
        self.gate_b = w("model.early_exit_gate.bias")
        self.blocks = []
        for i in range(self.layers):
            p = f"model.layers.{i}."
            self.blocks.append({
                "n1": w(p + "input_layernorm.weight"),
                "n2": w(p + "input_layernorm_2.weight"),
                "n3": w(p + "post_attention_layernorm.weight"),
                "n4": w(p + "post_attention_layernorm_2.weight"),
                # q, k, v fused into one matmul: one pass over the activations, as a tuned eager
                # implementation would do.
                "qkv": torch.cat([w(p + "self_attn.q_proj.weight"), w(p + "self_attn.k_proj.weight"),
                                  w(p + "self_attn.v_proj.weight")]).t().contiguous(),
                "o": w(p + "self_attn.o_proj.weight").t().contiguous(),
                "gu": torch.cat([w(p + "mlp.gate_proj.weight"), w(p + "mlp.up_proj.weight")]).t().contiguous(),
                "down": w(p + "mlp.down_proj.weight").t().contiguous(),
            })
        self.lm_head_t = self.lm_head.t().contiguous()
        del t
        half = torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim
        self.inv_freq = 1.0 / (self.theta ** half)

    def rms(self, x, w):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return w * xf.to(x.dtype)

    def rope(self, positions):
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @staticmethod
    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def new_cache(self, batch, max_len):
        """Per-step, per-layer K and V buffers: R*L entries of [B, kvH, max_len, D] each."""
        shape = (batch, self.kv_heads, max_len, self.head_dim)
        return {
            "len": 0,
            "k": [torch.zeros(shape, dtype=self.dtype) for _ in range(self.steps * self.layers)],
            "v": [torch.zeros(shape, dtype=self.dtype) for _ in range(self.steps * self.layers)],
        }

    def attention(self, x, blk, cache, slot, start, cos, sin):
        B, S, _ = x.shape
        H, KH, D = self.heads, self.kv_heads, self.head_dim
        qkv = x @ blk["qkv"]
        q, k, v = qkv.split([H * D, KH * D, KH * D], dim=-1)
        q = q.view(B, S, H, D).transpose(1, 2)
        k = k.view(B, S, KH, D).transpose(1, 2)
        v = v.view(B, S, KH, D).transpose(1, 2)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        end = start + S
        cache["k"][slot][:, :, start:end] = k
        cache["v"][slot][:, :, start:end] = v
        K = cache["k"][slot][:, :, :end]  # [B, KH, T, D]
        V = cache["v"][slot][:, :, :end]
        g = H // KH
        qg = q.reshape(B, KH, g * S, D)  # heads of one KV group stacked along the query axis
        scores = (qg @ K.transpose(-1, -2)).float() * (1.0 / math.sqrt(D))  # [B, KH, g*S, T]
        if S > 1:
            qpos = torch.arange(start, end).repeat(g)
            mask = torch.arange(end)[None, :] > qpos[:, None]
            scores = scores.masked_fill(mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(self.dtype)
        out = (probs @ V).reshape(B, H, S, D).transpose(1, 2).reshape(B, S, H * D)
        return out @ blk["o"]

    def mlp(self, x, blk):
        gate, up = (x @ blk["gu"]).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ blk["down"]

    def forward(self, ids, cache, all_positions=False):
        """Runs ids [B, S] through all R steps, appending to the cache.

        Returns (per-step normed hidden states [R, B, S', H], step logits [R', B, S', V],
        gate logits [R, B, S']) where S' is S and R' is R with all_positions, else S' is 1 (the
        last position) and R' is 1 (the last step).
        """
        B, S = ids.shape
        start = cache["len"]
        cos, sin = self.rope(torch.arange(start, start + S))
        h = self.embed[ids]
        hiddens, logits, gates = [], [], []
        for step in range(self.steps):
            for i, blk in enumerate(self.blocks):
                slot = step * self.layers + i
                a = self.attention(self.rms(h, blk["n1"]), blk, cache, slot, start, cos, sin)
                h = h + self.rms(a, blk["n2"])
                m = self.mlp(self.rms(h, blk["n3"]), blk)
                h = h + self.rms(m, blk["n4"])
            h = self.rms(h, self.norm)
            sel = h if all_positions else h[:, -1:]
            hiddens.append(sel)
            # The gate runs after every step; the LM head only where a token is chosen (the
            # last step) unless every step's logits are asked for, as an exit-aware engine does.
            if all_positions or step == self.steps - 1:
                logits.append(sel @ self.lm_head_t)
            gates.append((sel @ self.gate_w.t()).squeeze(-1) + self.gate_b)
        cache["len"] = start + S
        return torch.stack(hiddens), torch.stack(logits), torch.stack(gates)

    def generate(self, prompts, new_tokens):
        """Greedy full-depth continuation of equal-length prompts [B, S]; returns [B, new_tokens]."""
        B, S = prompts.shape
        cache = self.new_cache(B, S + new_tokens)
        _, logits, _ = self.forward(prompts, cache)
        out = []
        nxt = logits[-1, :, -1].argmax(-1)
        for i in range(new_tokens):
            out.append(nxt)
            if i + 1 == new_tokens:
                break
            _, logits, _ = self.forward(nxt[:, None], cache)
            nxt = logits[-1, :, -1].argmax(-1)
        return torch.stack(out, dim=1)


def check_main(args):
    model = Ouro(args.model, torch.float32)
    golden = read_safetensors(args.golden)
    names = sorted({k.split(".")[0] for k in golden})
    report = {"model": args.model, "prompts": [], "ok": True}
    generated = {}
    if args.golden_json:
        with open(args.golden_json) as f:
            for i, p in enumerate(json.load(f)["prompts"]):
                generated[f"p{i}"] = p["generate"]["full"]["ids"]
    with torch.no_grad():
        for name in names:
            ids = golden[name + ".input_ids"].long()
            cache = model.new_cache(1, ids.numel())
            _, logits, gates = model.forward(ids[None], cache, all_positions=True)
            dl = (logits[:, 0] - golden[name + ".step_logits"]).abs().max().item()
            dg = (gates[:, 0] - golden[name + ".gate_logits"]).abs().max().item()
            entry = {"prompt": name, "max_abs_step_logits": dl, "max_abs_gate_logits": dg}
            ok = dl <= 1e-3 and dg <= 1e-4
            if name in generated:
                want = generated[name]
                got = model.generate(ids[None], len(want))[0].tolist()
                entry["greedy_full_match"] = got == want
                ok = ok and got == want
            entry["ok"] = ok
            report["ok"] = report["ok"] and ok
            report["prompts"].append(entry)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def bench_main(args):
    """Times prefill and greedy full-depth decode at batch 1 and batch B.

    stdin: {"prefill_prompt": [ids], "decode_prompts": [[ids], ...] (B equal-length prompts),
            "decode_tokens": N, "repeats": n}
    Prefill tok/s = prompt length / time of one prefill (all R steps, last position's logits).
    Decode tok/s at batch b = b * (N-1) / time of the N-1 cached decode forwards after prefill.
    """
    spec = json.load(sys.stdin)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    # Debian's torch starts with one OpenMP thread here; the engine uses every core, so does the peer.
    torch.set_num_threads(args.threads if args.threads > 0 else len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    model = Ouro(args.model, dtype)
    load_s = time.perf_counter() - t0
    repeats = max(1, spec.get("repeats", 1))
    n = spec["decode_tokens"]
    if n < 2:
        raise SystemExit("decode_tokens must be at least 2")

    def prefill(ids):
        best = float("inf")
        for _ in range(repeats):
            cache = model.new_cache(ids.shape[0], ids.shape[1])
            t = time.perf_counter()
            model.forward(ids, cache)
            best = min(best, time.perf_counter() - t)
        return best

    def decode(ids):
        best = float("inf")
        B, S = ids.shape
        for _ in range(repeats):
            cache = model.new_cache(B, S + n)
            _, logits, _ = model.forward(ids, cache)
            nxt = logits[-1, :, -1].argmax(-1)
            t = time.perf_counter()
            for _ in range(n - 1):
                _, logits, _ = model.forward(nxt[:, None], cache)
                nxt = logits[-1, :, -1].argmax(-1)
            best = min(best, time.perf_counter() - t)
        return best

    with torch.no_grad():
        # Warm-up: first calls allocate and pick kernels.
        warm = torch.tensor([spec["prefill_prompt"][:8]])
        model.forward(warm, model.new_cache(1, warm.shape[1]))
        p = torch.tensor([spec["prefill_prompt"]])
        prefill_s = prefill(p)
        b1 = torch.tensor([spec["decode_prompts"][0]])
        d1_s = decode(b1)
        bb = torch.tensor(spec["decode_prompts"])
        db_s = decode(bb)
    out = {
        "torch": torch.__version__,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "loop_steps": model.steps,
        "prefill_tokens": p.shape[1],
        "prefill_s": prefill_s,
        "prefill_tok_s": p.shape[1] / prefill_s,
        "decode_tokens": n - 1,
        "decode_s_b1": d1_s,
        "decode_tok_s_b1": (n - 1) / d1_s,
        "batch": bb.shape[0],
        "decode_s_bn": db_s,
        "decode_tok_s_bn": bb.shape[0] * (n - 1) / db_s,
    }
    print(json.dumps(out))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("check")
    c.add_argument("--model", required=True)
    c.add_argument("--golden", required=True)
    c.add_argument("--golden-json")
    b = sub.add_parser("bench")
    b.add_argument("--model", required=True)
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    b.add_argument("--threads", type=int, default=0, help="torch threads (0: every core this process may run on)")
    args = ap.parse_args()
    return check_main(args) if args.mode == "check" else bench_main(args)


if __name__ == "__main__":
    sys.exit(main())
