package main

import (
	"bytes"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/loopserve/loopserve/runtime/model"
)

func runCmd(t *testing.T, args ...string) string {
	t.Helper()
	root := newRoot()
	var out, errOut bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&errOut)
	root.SetArgs(args)
	if err := root.Execute(); err != nil {
		t.Fatalf("loopserve %s: %v\n%s", strings.Join(args, " "), err, errOut.String())
	}
	return out.String()
}

func readTensors(t *testing.T, path string) map[string]model.Tensor {
	t.Helper()
	ts, _, err := model.ReadSafetensors(path)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]model.Tensor{}
	for _, x := range ts {
		out[x.Name] = x
	}
	return out
}

// TestForwardDumpMatchesGolden dumps golden prompts (by text and by ids) and compares every
// tensor with the golden file.
func TestForwardDumpMatchesGolden(t *testing.T) {
	const testdata = "../../testdata"
	golden := readTensors(t, filepath.Join(testdata, "golden", "ouro-tiny-arith.safetensors"))
	ids, err := golden["p3.input_ids"].Int64()
	if err != nil {
		t.Fatal(err)
	}
	var idArg []string
	for _, id := range ids {
		idArg = append(idArg, strconv.FormatInt(id, 10))
	}
	dump := filepath.Join(t.TempDir(), "p3.safetensors")
	for _, args := range [][]string{
		{"--ids", strings.Join(idArg, ",")},
		{"--prompt", "<|im_start|>user\nhello<|im_end|>\n"},
	} {
		out := runCmd(t, append([]string{"forward", "--model", testdata + "/models/ouro-tiny-arith", "--dump", dump}, args...)...)
		if !strings.Contains(out, "9 tokens, 4 loop steps") {
			t.Errorf("output %q", out)
		}
		got := readTensors(t, dump)
		gotIDs, err := got["input_ids"].Int64()
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(gotIDs, ids); diff != "" {
			t.Errorf("input_ids (-got +want):\n%s", diff)
		}
		for _, c := range []struct {
			name string
			tol  float64
		}{{"step_logits", 1e-3}, {"gate_logits", 1e-4}, {"exit_pdf", 1e-4}} {
			g, want := got[c.name], golden["p3."+c.name]
			if !cmp.Equal(g.Shape, want.Shape) || g.DType != model.F32 {
				t.Fatalf("%s: %s %v, want F32 %v", c.name, g.DType, g.Shape, want.Shape)
			}
			gv, _ := g.Float32()
			wv, _ := want.Float32()
			for i := range wv {
				if d := math.Abs(float64(gv[i] - wv[i])); d > c.tol {
					t.Fatalf("%s[%d] = %g, want %g", c.name, i, gv[i], wv[i])
				}
			}
		}
	}
}

func TestGenerateGolden(t *testing.T) {
	// The golden greedy continuation of "a = 2 ; n = a + 7 ; ... ? m =" at full depth starts " 7 ;" (ids 330 263).
	out := runCmd(t, "generate", "--model", "../../testdata/models/ouro-tiny-arith", "--max-tokens", "2", "--exit-step", "3", "--ignore-eos",
		"--prompt", "a = 2 ; n = a + 7 ; b = 0 ; p = 8 ; k = p + 3 ; r = 3 ; i = b + 5 ; m = k + 9 ; ? m =")
	for _, want := range []string{"    0     330    4/4", "    1     263    4/4", "mean depth 4.00 of 4"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	out = runCmd(t, "generate", "--model", "../../testdata/models/ouro-tiny-arith", "--max-tokens", "3", "--mode", "fast", "--kv-policy", "last",
		"--exit-step", "0", "--prompt", "a = 2 ; ? a =")
	if !strings.Contains(out, "mean depth 1.00 of 4") || !strings.Contains(out, "2 decode loop steps") {
		t.Errorf("fast generation at step 0:\n%s", out)
	}
}

// TestForwardErrors: bad --ids input names the flag the user gave, and no dump is written.
func TestForwardErrors(t *testing.T) {
	model := "../../testdata/models/ouro-tiny-arith"
	dump := filepath.Join(t.TempDir(), "out.safetensors")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--ids", "1,x"}, `parsing --ids: "x" is not a token id`},
		{[]string{"--ids", "[1,"}, "parsing --ids"},
		{[]string{"--ids", "1,99999"}, "outside vocabulary"},
		{[]string{"--ids", "1", "--prompt", "a"}, "exactly one of --prompt and --ids"},
	} {
		root := newRoot()
		var out, errOut bytes.Buffer
		root.SetOut(&out)
		root.SetErr(&errOut)
		root.SetArgs(append([]string{"forward", "--model", model, "--dump", dump}, tc.args...))
		if err := root.Execute(); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("forward %v: error %v, want one containing %q", tc.args, err, tc.want)
		}
		if _, err := os.Stat(dump); err == nil {
			t.Errorf("forward %v: wrote %s despite the error", tc.args, dump)
		}
	}
}

// TestGenerateStopsAtGenerationConfigEOS: generate stops at the eos ids of
// generation_config.json too (here the golden's first token, 330), unless --ignore-eos.
func TestGenerateStopsAtGenerationConfigEOS(t *testing.T) {
	src, err := filepath.Abs("../../testdata/models/ouro-tiny-arith")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, f := range []string{"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} {
		if err := os.Symlink(filepath.Join(src, f), filepath.Join(dir, f)); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "generation_config.json"), []byte(`{"eos_token_id": [330]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	args := []string{"generate", "--model", dir, "--max-tokens", "3", "--exit-step", "3",
		"--prompt", "a = 2 ; n = a + 7 ; b = 0 ; p = 8 ; k = p + 3 ; r = 3 ; i = b + 5 ; m = k + 9 ; ? m ="}
	if out := runCmd(t, args...); !strings.Contains(out, "1 generated (finish: stop)") {
		t.Errorf("generation went past generation_config.json's eos id 330:\n%s", out)
	}
	if out := runCmd(t, append(args, "--ignore-eos")...); !strings.Contains(out, "3 generated (finish: length)") {
		t.Errorf("--ignore-eos stopped early:\n%s", out)
	}
}
