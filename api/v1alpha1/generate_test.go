package v1alpha1

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// controllerGen is the pinned generator of the Makefile's generate target.
const controllerGen = "sigs.k8s.io/controller-tools/cmd/controller-gen@v0.23.0"

// TestGeneratedFilesUpToDate regenerates the deepcopy functions, the CRD and the operator's
// ClusterRole into a temp dir with the recipe of `make generate` and fails when the committed
// files (and the chart's copies) differ: run `make generate` and commit.
func TestGeneratedFilesUpToDate(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("the go tool is not on PATH: cannot run controller-gen")
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	gen := func(args ...string) {
		t.Helper()
		cmd := exec.Command(goTool, append([]string{"run", controllerGen}, args...)...)
		cmd.Dir = root
		// The generator is fetched and built on its own, outside this module's build flags.
		cmd.Env = append(os.Environ(), "GOFLAGS=")
		if b, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("controller-gen %v: %v\n%s", args, err, b)
		}
	}
	gen("object", "paths=./api/...", "output:object:dir="+filepath.Join(out, "object"))
	gen("crd:allowDangerousTypes=true", "rbac:roleName=loopserve-operator", "paths=./api/...", "paths=./controllers/...",
		"output:crd:dir="+filepath.Join(out, "crd"), "output:rbac:dir="+filepath.Join(out, "rbac"))

	crd := filepath.Join(out, "crd", "loopserve.io_loopmodels.yaml")
	role := filepath.Join(out, "rbac", "role.yaml")
	for _, tt := range []struct{ fresh, committed string }{
		{filepath.Join(out, "object", "zz_generated.deepcopy.go"), "api/v1alpha1/zz_generated.deepcopy.go"},
		{crd, "config/crd/bases/loopserve.io_loopmodels.yaml"},
		{crd, "charts/loopserve/crds/loopserve.io_loopmodels.yaml"},
		{role, "config/rbac/role.yaml"},
		{role, "charts/loopserve/files/operator-role.yaml"},
	} {
		want, err := os.ReadFile(tt.fresh)
		if err != nil {
			t.Fatalf("reading generated %s: %v", tt.fresh, err)
		}
		got, err := os.ReadFile(filepath.Join(root, tt.committed))
		if err != nil {
			t.Errorf("reading committed %s: %v (run make generate)", tt.committed, err)
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s is stale: run make generate and commit (-committed +generated):\n%s", tt.committed, cmp.Diff(string(got), string(want)))
		}
	}
}
