package main

import "github.com/spf13/cobra"

func newTokenizeCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "tokenize",
		Short: "Encode text to token ids or decode ids to text",
		Long: `Uses a Hugging Face tokenizer.json (byte-level BPE) to print the ids of --text as a JSON array,
or with --decode the text of the given ids.`,
		Args: cobra.NoArgs,
		RunE: notImplemented("tokenize"),
	}
}
