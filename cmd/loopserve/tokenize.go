package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/loopserve/loopserve/runtime/tokenizer"
)

func newTokenizeCmd() *cobra.Command {
	var model, file, text, decode string
	cmd := &cobra.Command{
		Use:   "tokenize (--model DIR | --tokenizer FILE) (--text T | --decode IDS)",
		Short: "Encode text to token ids or decode ids to text",
		Long: `Uses a Hugging Face tokenizer.json (byte-level BPE) to print the ids of --text as a JSON array,
or with --decode the text of the given ids. Special tokens written in the text (e.g. <|im_start|>)
become their ids; no BOS is added. --text - reads the text from standard input.`,
		Example: `  loopserve tokenize --model testdata/models/ouro-tiny-arith --text 'a = 2 ; ? a ='
  loopserve tokenize --tokenizer tokenizer.json --decode '[1, 69, 391]'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (model == "") == (file == "") {
				return errors.New("give exactly one of --model and --tokenizer")
			}
			textSet, decodeSet := cmd.Flags().Changed("text"), cmd.Flags().Changed("decode")
			if textSet == decodeSet {
				return errors.New("give exactly one of --text and --decode")
			}
			var tok *tokenizer.Tokenizer
			var err error
			if model != "" {
				tok, err = tokenizer.LoadDir(model)
			} else {
				tok, err = tokenizer.Load(file)
			}
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if decodeSet {
				ids, err := parseIDs("decode", decode)
				if err != nil {
					return err
				}
				_, err = fmt.Fprintln(out, tok.Decode(ids))
				return err
			}
			if text == "-" {
				data, err := io.ReadAll(cmd.InOrStdin())
				if err != nil {
					return fmt.Errorf("reading text from stdin: %w", err)
				}
				text = string(data)
			}
			ids := tok.Encode(text)
			if ids == nil {
				ids = []int{}
			}
			data, err := json.Marshal(ids)
			if err != nil {
				return err
			}
			_, err = fmt.Fprintln(out, string(data))
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&model, "model", "", "model folder holding tokenizer.json (and tokenizer_config.json)")
	f.StringVar(&file, "tokenizer", "", "a tokenizer.json file")
	f.StringVar(&text, "text", "", `text to encode ("-" reads standard input)`)
	f.StringVar(&decode, "decode", "", `ids to decode: a JSON array, or numbers separated by commas or spaces`)
	return cmd
}

// parseIDs reads "[1, 2, 3]", "1,2,3" or "1 2 3" given to the flag named flag.
func parseIDs(flag, s string) ([]int, error) {
	s = strings.TrimSpace(s)
	if strings.HasPrefix(s, "[") {
		var ids []int
		if err := json.Unmarshal([]byte(s), &ids); err != nil {
			return nil, fmt.Errorf("parsing --%s %q as a JSON array of ids: %w", flag, s, err)
		}
		return ids, nil
	}
	fields := strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' || r == '\n' })
	ids := make([]int, 0, len(fields))
	for _, f := range fields {
		id, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("parsing --%s: %q is not a token id", flag, f)
		}
		ids = append(ids, id)
	}
	return ids, nil
}
