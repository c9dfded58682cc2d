package main

import "github.com/spf13/cobra"

func newGenerateCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "generate",
		Short: "Generate text from a local model and show each token's loop depth",
		Long: `Loads a Hugging Face Ouro checkpoint, tokenizes the prompt, generates with the chosen exit
mode and KV policy, and prints the text and the loop depth of every generated token.`,
		Args: cobra.NoArgs,
		RunE: notImplemented("generate"),
	}
}
