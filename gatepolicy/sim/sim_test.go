package sim

import (
	"fmt"
	"testing"
)

func TestZZDevCompare(t *testing.T) {
	c := DefaultConfig(DefaultProfile(), Synthetic(DefaultShape, 1), 1)
	rep, err := Compare(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range Names {
		r := rep[n]
		fmt.Printf("%-24s att %.4f ttft %.4f agree %.4f rs %.0f ev %d  %s\n", n, r.Attainment, r.TTFTAttainment, r.Agreement, r.ReplicaSeconds, r.ScaleEvents, r.Setting)
	}
}
