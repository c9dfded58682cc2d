package main

import (
	"bytes"
	"strings"
	"testing"
)

func runTokenize(t *testing.T, stdin string, args ...string) (string, error) {
	t.Helper()
	cmd := newTokenizeCmd()
	var out bytes.Buffer
	cmd.SetOut(&out)
	cmd.SetErr(&out)
	cmd.SetIn(strings.NewReader(stdin))
	cmd.SetArgs(args)
	err := cmd.Execute()
	return out.String(), err
}

func TestTokenize(t *testing.T) {
	const model = "../../testdata/models/ouro-tiny-arith"
	const qwen = "../../testdata/golden/tokenizers/qwen3/tokenizer.json"
	for _, tc := range []struct {
		name  string
		stdin string
		args  []string
		want  string
	}{
		{"encode model", "", []string{"--model", model, "--text", "a = 2 ; ? a ="}, "[69,262,311,263,325,266,262]\n"},
		{"encode file", "", []string{"--tokenizer", qwen, "--text", "hello world<|im_end|>"}, "[14990,1879,151645]\n"},
		{"encode empty", "", []string{"--tokenizer", qwen, "--text", ""}, "[]\n"},
		{"encode stdin", "hello world", []string{"--tokenizer", qwen, "--text", "-"}, "[14990,1879]\n"},
		{"decode json", "", []string{"--tokenizer", qwen, "--decode", "[14990, 1879, 151645]"}, "hello world<|im_end|>\n"},
		{"decode list", "", []string{"--model", model, "--decode", "69,262 311"}, "a = 2\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := runTokenize(t, tc.stdin, tc.args...)
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("output %q, want %q", got, tc.want)
			}
		})
	}
}

func TestTokenizeErrors(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--text", "x"}, "exactly one of --model and --tokenizer"},
		{[]string{"--model", "a", "--tokenizer", "b", "--text", "x"}, "exactly one of --model and --tokenizer"},
		{[]string{"--tokenizer", "b"}, "exactly one of --text and --decode"},
		{[]string{"--tokenizer", t.TempDir() + "/none.json", "--text", "x"}, "no such file"},
		{[]string{"--model", "../../testdata/models/ouro-tiny-arith", "--decode", "1,x"}, `"x" is not a token id`},
	} {
		if _, err := runTokenize(t, "", tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("tokenize %v: error %v, want one containing %q", tc.args, err, tc.want)
		}
	}
}
