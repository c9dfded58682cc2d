package main

import (
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/internal/progress"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
	"github.com/loopserve/loopserve/runtime/tokenizer"
)

func newGenerateCmd() *cobra.Command {
	var (
		dir, prompt, mode, kvPolicy string
		maxTokens, exitStep, topK   int
		threshold, temp, topP       float64
		seed                        uint64
		draft, draftDepth           int
		bf                          backendFlags
		chat, ignoreEOS, kvBF16     bool
		stops                       []string
	)
	cmd := &cobra.Command{
		Use:   "generate --model DIR --prompt TEXT",
		Short: "Generate text from a local model and show each token's loop depth",
		Long: `Loads a Hugging Face Ouro checkpoint, tokenizes the prompt, generates with the chosen exit
mode and KV policy, and prints the text and the loop depth of every generated token.

--exit-threshold Q exits a token at the first loop step whose cumulative exit probability reaches
Q (0 takes the model's early_exit_threshold); --exit-step K runs exactly steps 0..K. --mode exact
computes every step and selects (the reference semantics); --mode fast stops at the exit.`,
		Example: `  loopserve generate --model testdata/models/ouro-tiny-arith --prompt 'a = 2 ; ? a =' --max-tokens 4
  loopserve generate --model DIR --prompt 'Hi' --chat --mode fast --exit-threshold 0.9 --kv-policy last`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" || prompt == "" {
				return errors.New("--model and --prompt are required")
			}
			md, err := engine.ParseMode(mode)
			if err != nil {
				return err
			}
			kv, err := engine.ParseKVPolicy(kvPolicy)
			if err != nil {
				return err
			}
			tok, err := tokenizer.LoadDir(dir)
			if err != nil {
				return err
			}
			m, err := loadModel(dir, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer m.Close()
			text := prompt
			if chat {
				if text, err = tok.ApplyChat([]tokenizer.Message{{Role: "user", Content: prompt}}, true); err != nil {
					return err
				}
			}
			ids := tok.Encode(text)
			be, err := bf.backend()
			if err != nil {
				return err
			}
			e, err := engine.New(m, engine.Options{Backend: be, Mode: md, KVPolicy: kv, KVBF16: kvBF16, MaxBatch: 1, Decode: tok.Decode})
			if err != nil {
				return err
			}
			defer e.Close()
			req := engine.Request{Prompt: ids, MaxTokens: maxTokens, IgnoreEOS: ignoreEOS, StopStrings: stops,
				Sampling:    engine.Sampling{Temperature: temp, TopK: topK, TopP: topP, Seed: seed},
				Exit:        engine.Exit{Threshold: threshold},
				Speculative: engine.Speculative{Draft: draft, DraftDepth: draftDepth}}
			if exitStep >= 0 {
				req.Exit.ForceDepth = exitStep + 1
			}
			if !ignoreEOS {
				// Stop at every eos id the checkpoint declares, as transformers does.
				gen, err := model.LoadGenerationConfig(dir)
				if err != nil {
					return err
				}
				req.StopTokens = gen.EOSTokenIDs
				if id, ok := tok.EOS(); ok {
					req.StopTokens = append(req.StopTokens, id)
				}
			}
			var toks []engine.Token
			var ids2 []int
			out := cmd.OutOrStdout()
			stream := progress.IsTerminal(out)
			printed := ""
			start := time.Now()
			finish, err := e.Generate(cmd.Context(), req, func(t engine.Token) bool {
				toks = append(toks, t)
				if stream {
					// Show the text as it grows, holding back an incomplete UTF-8 sequence.
					ids2 = append(ids2, t.ID)
					if text := tok.Decode(ids2); strings.HasPrefix(text, printed) && !strings.HasSuffix(text, "\uFFFD") {
						fmt.Fprint(out, text[len(printed):])
						printed = text
					}
				}
				return true
			})
			if stream {
				fmt.Fprint(out, "\n\n")
			}
			if err != nil {
				return err
			}
			return printGeneration(out, tok, m.Config.TotalUTSteps, len(ids), toks, finish, time.Since(start), e.Stats(), !stream)
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "model", "", "model directory (config.json, safetensors, tokenizer.json)")
	f.StringVar(&prompt, "prompt", "", "prompt text (special tokens such as <|im_start|> are recognised)")
	f.BoolVar(&chat, "chat", false, "wrap the prompt as one user turn of the model's chat template")
	f.IntVar(&maxTokens, "max-tokens", 32, "tokens to generate")
	f.Float64Var(&threshold, "exit-threshold", 0, "Q-exit threshold in (0, 1]; 0 takes the model's")
	f.IntVar(&exitStep, "exit-step", -1, "force every token to exit at this loop step (0-based); -1 for none")
	f.StringVar(&kvPolicy, "kv-policy", "full", "KV cache policy: full (per step) or last (one per layer)")
	f.StringVar(&mode, "mode", "exact", "exact (compute every step) or fast (stop at the exit)")
	f.BoolVar(&kvBF16, "kv-bf16", false, "store keys and values as bfloat16 (half the KV memory)")
	f.Float64Var(&temp, "temperature", 0, "sampling temperature; 0 is greedy")
	f.IntVar(&topK, "top-k", 0, "sample among the k most likely tokens; 0 for all")
	f.Float64Var(&topP, "top-p", 0, "nucleus sampling mass; 0 or 1 for all")
	f.Uint64Var(&seed, "seed", 0, "sampling seed")
	f.StringSliceVar(&stops, "stop", nil, "stop when the generated text contains this string (repeatable)")
	f.BoolVar(&ignoreEOS, "ignore-eos", false, "keep generating past the end-of-sequence token")
	f.IntVar(&draft, "speculative", 0, "self-speculative decoding: draft this many tokens per verification (greedy only)")
	f.IntVar(&draftDepth, "draft-depth", 1, "loop steps for speculative drafts")
	bf.register(cmd)
	return cmd
}

// printGeneration writes the continuation, then one line per token with its depth.
func printGeneration(w io.Writer, tok *tokenizer.Tokenizer, R, promptLen int, toks []engine.Token, finish string, d time.Duration, st engine.Counters, withText bool) error {
	ids := make([]int, len(toks))
	depthSum := 0
	for i, t := range toks {
		ids[i] = t.ID
		depthSum += t.Depth
	}
	var b strings.Builder
	if withText {
		fmt.Fprintf(&b, "%s\n\n", tok.Decode(ids))
	}
	fmt.Fprintf(&b, "%5s %7s %6s  %s\n", "#", "id", "depth", "token")
	for i, t := range toks {
		fmt.Fprintf(&b, "%5d %7d %4d/%d  %q\n", i, t.ID, t.Depth, R, tok.Decode([]int{t.ID}))
	}
	mean := 0.0
	if len(toks) > 0 {
		mean = float64(depthSum) / float64(len(toks))
	}
	fmt.Fprintf(&b, "\n%d prompt tokens, %d generated (finish: %s), mean depth %.2f of %d, %d decode loop steps, %.1f tok/s\n",
		promptLen, len(toks), finish, mean, R, st.LoopSteps, float64(len(toks))/d.Seconds())
	_, err := io.WriteString(w, b.String())
	return err
}

// loadModel loads a checkpoint; one over 64 MB shows progress on a terminal (one rewritten
// line) and logs plain lines (each quarter) when stderr is not a terminal.
func loadModel(dir string, stderr io.Writer) (*model.Model, error) {
	r := progress.New(stderr, "loading "+dir, 64<<20)
	m, err := model.LoadProgress(dir, func(p model.Progress) { r.Update(p.Done, p.Total) })
	if err != nil {
		return nil, err
	}
	r.Done()
	return m, nil
}
