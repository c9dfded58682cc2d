// Package podnet gives each pod of a one-machine cluster its own network namespace and IPv4
// address, as a CNI plugin does on a node: a host bridge holds the first address of a prefix,
// and each sandbox is a network namespace joined to the bridge by a veth pair, with the next
// free address and a default route through the bridge. It drives ip(8) (iproute2) and needs
// root (CAP_NET_ADMIN); Available says whether this machine allows it.
//
// Ownership: a Network owns its bridge and every Sandbox it adds; Sandbox.Remove deletes the
// namespace and its veth pair, Network.Close removes what is left and the bridge.
package podnet

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
)

// ErrExhausted is returned by Add when the prefix has no free address left.
var ErrExhausted = errors.New("no free pod address")

// Available reports why network namespaces cannot be made here, or nil when they can.
func Available() error {
	if os.Geteuid() != 0 {
		return errors.New("not root: network namespaces need CAP_NET_ADMIN")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return fmt.Errorf("ip(8) (iproute2) not found: %w", err)
	}
	name := fmt.Sprintf("lsprobe%d", os.Getpid())
	if err := ip("netns", "add", name); err != nil {
		return fmt.Errorf("creating a network namespace: %w", err)
	}
	return ip("netns", "del", name)
}

// Network is a bridge on the host with an address prefix for its sandboxes.
type Network struct {
	bridge  string
	prefix  netip.Prefix
	gateway netip.Addr

	mu    sync.Mutex
	used  map[netip.Addr]string // address -> sandbox name
	boxes map[string]*Sandbox
}

// New creates the bridge (at most 15 characters, as Linux allows) with the first address of
// prefix (an IPv4 prefix of /16 to /30) and brings it up.
func New(bridge string, prefix netip.Prefix) (*Network, error) {
	if !prefix.Addr().Is4() || prefix.Bits() < 16 || prefix.Bits() > 30 {
		return nil, fmt.Errorf("pod prefix %s: want an IPv4 prefix of /16 to /30", prefix)
	}
	if len(bridge) == 0 || len(bridge) > 15 {
		return nil, fmt.Errorf("bridge name %q: want 1 to 15 characters", bridge)
	}
	prefix = prefix.Masked()
	n := &Network{bridge: bridge, prefix: prefix, gateway: prefix.Addr().Next(), used: map[netip.Addr]string{}, boxes: map[string]*Sandbox{}}
	if err := ip("link", "add", bridge, "type", "bridge"); err != nil {
		return nil, fmt.Errorf("creating bridge %s: %w", bridge, err)
	}
	if err := errors.Join(
		ip("addr", "add", netip.PrefixFrom(n.gateway, prefix.Bits()).String(), "dev", bridge),
		ip("link", "set", bridge, "up"),
	); err != nil {
		return nil, errors.Join(fmt.Errorf("configuring bridge %s: %w", bridge, err), ip("link", "del", bridge))
	}
	return n, nil
}

// Gateway is the bridge's address, the sandboxes' default route (the host as pods see it).
func (n *Network) Gateway() netip.Addr { return n.gateway }

// Sandbox is one pod's network namespace.
type Sandbox struct {
	net  *Network
	name string // the namespace, as ip netns names it
	host string // the host end of the veth pair
	addr netip.Addr
}

// Add creates the namespace name with loopback up and eth0 on the bridge at the next free address.
func (n *Network) Add(name string) (*Sandbox, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.boxes[name]; ok {
		return nil, fmt.Errorf("sandbox %s exists", name)
	}
	addr, err := n.free()
	if err != nil {
		return nil, err
	}
	// The host end is named after the address, unique within the bridge's prefix and short.
	b := addr.As4()
	s := &Sandbox{net: n, name: name, host: fmt.Sprintf("%.6s%02x%02x%02x", n.bridge, b[1], b[2], b[3]), addr: addr}
	if err := ip("netns", "add", name); err != nil {
		return nil, fmt.Errorf("creating network namespace %s: %w", name, err)
	}
	steps := [][]string{
		{"link", "add", s.host, "type", "veth", "peer", "name", "eth0", "netns", name},
		{"link", "set", s.host, "master", n.bridge},
		{"link", "set", s.host, "up"},
		{"-n", name, "link", "set", "lo", "up"},
		{"-n", name, "addr", "add", netip.PrefixFrom(addr, n.prefix.Bits()).String(), "dev", "eth0"},
		{"-n", name, "link", "set", "eth0", "up"},
		{"-n", name, "route", "add", "default", "via", n.gateway.String()},
	}
	for _, st := range steps {
		if err := ip(st...); err != nil {
			return nil, errors.Join(fmt.Errorf("setting up sandbox %s: %w", name, err), s.remove())
		}
	}
	n.used[addr] = name
	n.boxes[name] = s
	return s, nil
}

func (n *Network) free() (netip.Addr, error) {
	for a := n.gateway.Next(); n.prefix.Contains(a); a = a.Next() {
		if !n.prefix.Contains(a.Next()) {
			break // the broadcast address
		}
		if _, ok := n.used[a]; !ok {
			return a, nil
		}
	}
	return netip.Addr{}, fmt.Errorf("%w in %s", ErrExhausted, n.prefix)
}

// Addr is the sandbox's address on eth0, the pod IP.
func (s *Sandbox) Addr() netip.Addr { return s.addr }

// Name is the network namespace's name.
func (s *Sandbox) Name() string { return s.name }

// Command returns a command that runs bin with args inside the sandbox (`ip netns exec`).
func (s *Sandbox) Command(bin string, args ...string) *exec.Cmd {
	return exec.Command("ip", append([]string{"netns", "exec", s.name, bin}, args...)...)
}

// Remove deletes the veth pair and the namespace, and frees the address.
func (s *Sandbox) Remove() error {
	n := s.net
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.boxes[s.name] != s {
		return nil
	}
	delete(n.boxes, s.name)
	delete(n.used, s.addr)
	return s.remove()
}

func (s *Sandbox) remove() error {
	// Deleting the host end removes the pair at once; a namespace's own links go asynchronously.
	if err := ip("link", "del", s.host); err != nil && !strings.Contains(err.Error(), "Cannot find device") {
		return fmt.Errorf("deleting veth %s: %w", s.host, err)
	}
	err := ip("netns", "del", s.name)
	if err != nil && !strings.Contains(err.Error(), "No such file") {
		return fmt.Errorf("deleting network namespace %s: %w", s.name, err)
	}
	return nil
}

// Close removes every sandbox left and the bridge.
func (n *Network) Close() error {
	n.mu.Lock()
	boxes := make([]*Sandbox, 0, len(n.boxes))
	for _, s := range n.boxes {
		boxes = append(boxes, s)
	}
	n.mu.Unlock()
	var errs []error
	for _, s := range boxes {
		errs = append(errs, s.Remove())
	}
	if err := ip("link", "del", n.bridge); err != nil {
		errs = append(errs, fmt.Errorf("deleting bridge %s: %w", n.bridge, err))
	}
	return errors.Join(errs...)
}

// ip runs ip(8) with args; its error carries ip's message.
func ip(args ...string) error {
	var stderr bytes.Buffer
	cmd := exec.Command("ip", args...)
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return nil
}
