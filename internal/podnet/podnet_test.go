package podnet

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/util/wait"
)

// The test binary doubles as the pods' program: PODNET_SERVE=addr serves the caller's address
// on addr; PODNET_GET=url prints what url answers.
func TestMain(m *testing.M) {
	if addr := os.Getenv("PODNET_SERVE"); addr != "" {
		err := http.ListenAndServe(addr, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			host, _, _ := net.SplitHostPort(r.RemoteAddr)
			fmt.Fprint(w, host)
		}))
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if url := os.Getenv("PODNET_GET"); url != "" {
		body, err := get(context.Background(), url)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		fmt.Print(body)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func get(ctx context.Context, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// serve starts the test binary as a server on :8080 inside s and waits until the host reaches it.
func serve(t *testing.T, s *Sandbox) string {
	t.Helper()
	cmd := s.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "PODNET_SERVE=:8080")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	url := "http://" + netip.AddrPortFrom(s.Addr(), 8080).String() + "/"
	err := wait.PollUntilContextTimeout(context.Background(), 50*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		_, err := get(ctx, url)
		return err == nil, nil
	})
	if err != nil {
		t.Fatalf("awaiting the server in %s at %s: %v", s.Name(), url, err)
	}
	return url
}

// TestSandboxesHaveTheirOwnAddressesAndPorts puts two sandboxes on a bridge: each gets its own
// address, both bind port 8080, the host reaches each through the bridge, and one reaches the
// other directly.
func TestSandboxesHaveTheirOwnAddressesAndPorts(t *testing.T) {
	if err := Available(); err != nil {
		t.Skip("network namespaces unavailable:", err)
	}
	prefix := netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", 200+os.Getpid()%50, os.Getpid()%250))
	n, err := New(fmt.Sprintf("lsbr%d", os.Getpid()%100000), prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := n.Close(); err != nil {
			t.Error(err)
		}
	})
	tag := fmt.Sprintf("ls%d", os.Getpid())
	a, err := n.Add(tag + "-a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := n.Add(tag + "-b")
	if err != nil {
		t.Fatal(err)
	}
	got := []string{n.Gateway().String(), a.Addr().String(), b.Addr().String()}
	base := prefix.Addr().As4()
	want := []string{
		netip.AddrFrom4([4]byte{base[0], base[1], base[2], 1}).String(),
		netip.AddrFrom4([4]byte{base[0], base[1], base[2], 2}).String(),
		netip.AddrFrom4([4]byte{base[0], base[1], base[2], 3}).String(),
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("addresses (gateway, a, b) (-got +want):\n%s", diff)
	}

	urlA, urlB := serve(t, a), serve(t, b) // both on :8080
	for _, tt := range []struct{ url, want string }{{urlA, n.Gateway().String()}, {urlB, n.Gateway().String()}} {
		body, err := get(context.Background(), tt.url)
		if err != nil {
			t.Fatal(err)
		}
		if body != tt.want {
			t.Errorf("%s saw the host as %s, want the bridge address %s", tt.url, body, tt.want)
		}
	}

	cmd := b.Command(os.Args[0])
	cmd.Env = append(os.Environ(), "PODNET_GET="+urlA)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("sandbox b fetching %s: %v", urlA, exitDetail(err))
	}
	if got := strings.TrimSpace(string(out)); got != b.Addr().String() {
		t.Errorf("sandbox a saw sandbox b as %s, want %s", got, b.Addr())
	}

	if err := a.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := exec.Command("ip", "netns", "exec", a.Name(), "true").Run(); err == nil {
		t.Errorf("namespace %s still exists after Remove", a.Name())
	}
	c, err := n.Add(tag + "-c")
	if err != nil {
		t.Fatal(err)
	}
	if c.Addr() != a.Addr() {
		t.Errorf("a new sandbox got %s, want the freed %s", c.Addr(), a.Addr())
	}
}

func exitDetail(err error) error {
	if ee, ok := err.(*exec.ExitError); ok {
		return fmt.Errorf("%w: %s", err, ee.Stderr)
	}
	return err
}

// TestNewRefusesBadInput checks the arguments New refuses before touching the host.
func TestNewRefusesBadInput(t *testing.T) {
	tests := []struct {
		bridge, prefix, want string
	}{
		{"lsbr0", "fd00::/64", "want an IPv4 prefix"},
		{"lsbr0", "10.0.0.0/8", "want an IPv4 prefix"},
		{"lsbr0", "10.0.0.0/31", "want an IPv4 prefix"},
		{"a-bridge-name-too-long", "10.0.0.0/24", "want 1 to 15 characters"},
		{"", "10.0.0.0/24", "want 1 to 15 characters"},
	}
	for _, tt := range tests {
		_, err := New(tt.bridge, netip.MustParsePrefix(tt.prefix))
		if err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("New(%q, %s) = %v, want an error with %q", tt.bridge, tt.prefix, err, tt.want)
		}
	}
}
