package engine_test

import (
	"context"
	"fmt"

	"github.com/loopserve/loopserve/runtime/backend/cpu"
	"github.com/loopserve/loopserve/runtime/engine"
	"github.com/loopserve/loopserve/runtime/model"
)

// Generate decodes greedily in Fast mode: each token stops at the first loop step whose
// cumulative exit probability reaches 0.5.
func ExampleEngine_Generate() {
	m, err := model.Load("../../testdata/models/ouro-tiny-arith")
	if err != nil {
		fmt.Println(err)
		return
	}
	defer m.Close()
	e, err := engine.New(m, engine.Options{Backend: cpu.New(0), Mode: engine.Fast, Threshold: 0.5})
	if err != nil {
		fmt.Println(err)
		return
	}
	// "a = 2 ; n = a + 7 ; b = 0 ; ? n =" tokenized
	prompt := []int{69, 262, 311, 263, 283, 262, 266, 269, 328, 263, 268, 262, 297, 263, 325, 283, 262}
	finish, err := e.Generate(context.Background(), engine.Request{Prompt: prompt, MaxTokens: 4}, func(t engine.Token) bool {
		fmt.Printf("token %d at depth %d\n", t.ID, t.Depth)
		return true
	})
	fmt.Println(finish, err)
	fmt.Printf("%d decode loop steps\n", e.Stats().LoopSteps)
	// Output:
	// token 337 at depth 2
	// token 263 at depth 1
	// token 358 at depth 2
	// token 262 at depth 1
	// length <nil>
	// 4 decode loop steps
}
