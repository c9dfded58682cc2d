package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strings"
)

// ErrNoTorch reports that the peer's Python has no importable torch module.
var ErrNoTorch = errors.New("python has no torch module (install Debian's python3-torch)")

// Peer runs the PyTorch eager implementation in hack/peer/ouro.py as a subprocess. The zero
// value is not usable: Script must be set. A Peer is safe for concurrent use, though running
// two at once on the same cores measures neither.
type Peer struct {
	Python  string // interpreter; "" means /usr/bin/python3 (Debian's, which has python3-torch)
	Script  string // path to hack/peer/ouro.py
	Dtype   string // compute dtype: "float32" (default) or "bfloat16"
	Threads int    // torch threads; 0 means every core the process may use
}

// PeerSpec is what the peer's bench mode times: the same prompts the engine gets.
type PeerSpec struct {
	PrefillPrompt []int   `json:"prefill_prompt"`
	DecodePrompts [][]int `json:"decode_prompts"` // equal lengths; [0] is the batch-1 prompt
	DecodeTokens  int     `json:"decode_tokens"`  // tokens generated per sequence, ≥ 2
	Repeats       int     `json:"repeats"`        // best of this many runs, ≥ 1
}

// PeerResult is the peer's JSON output. Decode counts exclude the first token, which prefill yields.
type PeerResult struct {
	Torch         string  `json:"torch"`
	Dtype         string  `json:"dtype"`
	Threads       int     `json:"threads"`
	LoadSeconds   float64 `json:"load_s"`
	LoopSteps     int     `json:"loop_steps"`
	PrefillTokens int     `json:"prefill_tokens"`
	PrefillTokS   float64 `json:"prefill_tok_s"`
	DecodeTokens  int     `json:"decode_tokens"`
	DecodeTokSB1  float64 `json:"decode_tok_s_b1"`
	Batch         int     `json:"batch"`
	DecodeTokSBN  float64 `json:"decode_tok_s_bn"`
	OMPWaitPolicy string  `json:"omp_wait_policy"` // set by Bench: the policies whose best figures these are
}

// PeerCheck is the peer's comparison with a model's goldens.
type PeerCheck struct {
	OK      bool `json:"ok"`
	Prompts []struct {
		Prompt          string  `json:"prompt"`
		StepLogitsDiff  float64 `json:"max_abs_step_logits"`
		GateLogitsDiff  float64 `json:"max_abs_gate_logits"`
		GreedyFullMatch *bool   `json:"greedy_full_match"`
		OK              bool    `json:"ok"`
	} `json:"prompts"`
}

func (p Peer) python() string {
	if p.Python == "" {
		return "/usr/bin/python3"
	}
	return p.Python
}

// Available returns nil when the peer's interpreter can import torch, else an error wrapping
// ErrNoTorch (or the reason the interpreter could not run).
func (p Peer) Available(ctx context.Context) error {
	if _, err := os.Stat(p.Script); err != nil {
		return fmt.Errorf("peer script: %w", err)
	}
	out, err := exec.CommandContext(ctx, p.python(), "-c", "import torch").CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %w: %s", p.python(), ErrNoTorch, strings.TrimSpace(string(out)))
	}
	return nil
}

// Bench times prefill and decode of the model in modelDir on spec's prompts. With the
// caller's OMP_WAIT_POLICY set it runs the peer once under it; otherwise once with OpenMP
// spinning at barriers (ACTIVE, its default, best on an idle machine and for small operators)
// and once sleeping (PASSIVE, far better when other work shares the cores), and keeps each
// figure's best: the peer at its strongest.
func (p Peer) Bench(ctx context.Context, modelDir string, spec PeerSpec) (PeerResult, error) {
	policies := []string{"ACTIVE", "PASSIVE"}
	if v := os.Getenv("OMP_WAIT_POLICY"); v != "" {
		policies = []string{v}
	}
	var best PeerResult
	for i, policy := range policies {
		res, err := p.bench(ctx, modelDir, spec, policy)
		if err != nil {
			return PeerResult{}, err
		}
		if i == 0 {
			best = res
			continue
		}
		best.PrefillTokS = max(best.PrefillTokS, res.PrefillTokS)
		best.DecodeTokSB1 = max(best.DecodeTokSB1, res.DecodeTokSB1)
		best.DecodeTokSBN = max(best.DecodeTokSBN, res.DecodeTokSBN)
	}
	best.OMPWaitPolicy = strings.Join(policies, "|")
	return best, nil
}

func (p Peer) bench(ctx context.Context, modelDir string, spec PeerSpec, ompWait string) (PeerResult, error) {
	in, err := json.Marshal(spec)
	if err != nil {
		return PeerResult{}, fmt.Errorf("encoding peer spec: %w", err)
	}
	args := []string{p.Script, "bench", "--model", modelDir}
	if p.Dtype != "" {
		args = append(args, "--dtype", p.Dtype)
	}
	if p.Threads > 0 {
		args = append(args, "--threads", fmt.Sprint(p.Threads))
	}
	var res PeerResult
	if err := p.run(ctx, args, in, &res, "OMP_WAIT_POLICY="+ompWait); err != nil {
		return PeerResult{}, err
	}
	return res, nil
}

// Check compares the peer's float32 forward with the goldens of the model in modelDir.
// goldenJSON may be "" to skip the greedy continuation check.
func (p Peer) Check(ctx context.Context, modelDir, goldenTensors, goldenJSON string) (PeerCheck, error) {
	args := []string{p.Script, "check", "--model", modelDir, "--golden", goldenTensors}
	if goldenJSON != "" {
		args = append(args, "--golden-json", goldenJSON)
	}
	var res PeerCheck
	// check exits 1 on a mismatch but still prints its report: decode it either way.
	err := p.run(ctx, args, nil, &res)
	var exit *exec.ExitError
	if err != nil && !(errors.As(err, &exit) && exit.ExitCode() == 1 && len(res.Prompts) > 0) {
		return PeerCheck{}, err
	}
	return res, nil
}

func (p Peer) run(ctx context.Context, args []string, stdin []byte, out any, env ...string) error {
	cmd := exec.CommandContext(ctx, p.python(), args...)
	cmd.Env = append(os.Environ(), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	runErr := cmd.Run()
	if err := json.Unmarshal(bytes.TrimSpace(lastLine(stdout.Bytes())), out); err != nil && runErr == nil {
		return fmt.Errorf("reading peer output %q: %w", stdout.String(), err)
	}
	if runErr != nil {
		return fmt.Errorf("running peer %s: %w: %s", strings.Join(args[:2], " "), runErr, tail(stderr.String(), 2000))
	}
	return nil
}

func lastLine(b []byte) []byte {
	b = bytes.TrimRight(b, "\n")
	if i := bytes.LastIndexByte(b, '\n'); i >= 0 {
		return b[i+1:]
	}
	return b
}

func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

// Prompts returns deterministic pseudo-random prompts for a model with vocab entries: one of
// prefillLen tokens and batch of decodeLen tokens. Ids start at 5 so that no prompt holds a
// special token (pad, bos, eos, think tags).
func Prompts(vocab, prefillLen, decodeLen, batch int, seed uint64) (prefill []int, decode [][]int) {
	r := rand.New(rand.NewPCG(seed, 0x6c6f6f70))
	const first = 5
	draw := func(n int) []int {
		ids := make([]int, n)
		for i := range ids {
			ids[i] = first + r.IntN(vocab-first)
		}
		return ids
	}
	prefill = draw(prefillLen)
	decode = make([][]int, batch)
	for i := range decode {
		decode[i] = draw(decodeLen)
	}
	return prefill, decode
}
