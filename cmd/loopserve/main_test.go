package main

import (
	"os"
	"testing"
)

// TestMain runs the test binary as the loopserve command when LOOPSERVE_TEST_AS_CLI is 1, so
// that tests of commands which start loopserve processes (bench runtime --baseline) can point
// them at this binary instead of building one.
func TestMain(m *testing.M) {
	if os.Getenv("LOOPSERVE_TEST_AS_CLI") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}
