package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
	"github.com/loopserve/loopserve/runtime/tokenizer"
)

func newForwardCmd() *cobra.Command {
	var dir, prompt, idList, dump string
	var bf backendFlags
	var hidden bool
	cmd := &cobra.Command{
		Use:   "forward --model DIR (--prompt TEXT | --ids 1,2,3) --dump FILE",
		Short: "Run one exact forward pass and dump every loop step's outputs",
		Long: `Computes every loop step for every prompt token and writes input_ids (I64 [S]), step_logits
(F32 [R,S,V]), gate_logits (F32 [R,S]) and exit_pdf (F32 [R,S]) to a safetensors file, plus
final_hidden (F32 [R,S,H]) with --hidden. The layout is the goldens' (testdata/golden).`,
		Example: `  loopserve forward --model testdata/models/ouro-tiny-arith --prompt 'a = 2 ; ? a =' --dump out.safetensors`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if dir == "" || dump == "" || (prompt == "") == (idList == "") {
				return errors.New("give --model, --dump and exactly one of --prompt and --ids")
			}
			var ids []int
			if idList != "" {
				var err error
				if ids, err = parseIDs("ids", idList); err != nil {
					return err
				}
			} else {
				tok, err := tokenizer.LoadDir(dir)
				if err != nil {
					return err
				}
				ids = tok.Encode(prompt)
			}
			m, err := loadModel(dir, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer m.Close()
			be, err := bf.backend()
			if err != nil {
				return err
			}
			tr, err := engine.Forward(cmd.Context(), m, be, ids)
			if err != nil {
				return err
			}
			R, S := tr.Steps, tr.Len
			ids64 := make([]int64, S)
			for i, id := range ids {
				ids64[i] = int64(id)
			}
			ts := []model.Tensor{
				model.I64Tensor("input_ids", []int{S}, ids64),
				model.F32Tensor("step_logits", []int{R, S, tr.Vocab}, tr.StepLogits),
				model.F32Tensor("gate_logits", []int{R, S}, tr.GateLogits),
				model.F32Tensor("exit_pdf", []int{R, S}, tr.ExitPDF),
			}
			if hidden {
				ts = append(ts, model.F32Tensor("final_hidden", []int{R, S, tr.Width}, tr.Hidden))
			}
			if err := model.WriteSafetensors(dump, ts, map[string]string{"model": dir}); err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "wrote %s: %d tokens, %d loop steps, vocab %d\n", dump, S, R, tr.Vocab)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&dir, "model", "", "model directory (config.json, safetensors, tokenizer.json)")
	f.StringVar(&prompt, "prompt", "", "prompt text, tokenized with the model's tokenizer")
	f.StringVar(&idList, "ids", "", "token ids instead of a prompt: 1,2,3 or [1, 2, 3]")
	f.StringVar(&dump, "dump", "", "safetensors file to write")
	f.BoolVar(&hidden, "hidden", false, "also write final_hidden (norm(h) after every step)")
	bf.register(cmd)
	return cmd
}
