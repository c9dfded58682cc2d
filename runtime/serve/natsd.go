package serve

import (
	"cmp"
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// NATSOptions configure an embedded NATS server.
type NATSOptions struct {
	Host     string // listen address; "" = 127.0.0.1
	Port     int    // 0 = pick a free port
	StoreDir string // JetStream data directory (required)
}

// StartNATS starts an embedded NATS server with JetStream and waits until it accepts clients.
// Call Shutdown (and WaitForShutdown) on the result to stop it.
//
// JetStream is set to fsync every write (SyncAlways). The server's default flushes to disk only
// every two minutes, and Jepsen's analysis of NATS 2.12.1 showed that this loses acknowledged
// messages when machines crash; loopserve acks requests to clients as accepted once JetStream
// stored them, so production NATS servers should use the same setting:
//
//	jetstream { store_dir: /data, sync_interval: always }
func StartNATS(o NATSOptions) (*server.Server, error) {
	if o.StoreDir == "" {
		return nil, fmt.Errorf("starting NATS: a JetStream store directory is required")
	}
	host := o.Host
	if host == "" {
		host = "127.0.0.1"
	}
	port := o.Port
	if port == 0 {
		port = server.RANDOM_PORT
	}
	s, err := server.NewServer(&server.Options{
		ServerName: "loopserve",
		Host:       host,
		Port:       port,
		JetStream:  true,
		StoreDir:   o.StoreDir,
		SyncAlways: true,
		NoSigs:     true,
		NoLog:      true,
		MaxPayload: 8 << 20,
	})
	if err != nil {
		return nil, fmt.Errorf("starting NATS: %w", err)
	}
	s.Start()
	if !s.ReadyForConnections(30 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("starting NATS: not ready after 30s")
	}
	return s, nil
}

// NATSClusterOptions configure embedded NATS servers clustered on loopback: a real JetStream
// cluster in one process, for fault tests and `loopserve bench chaos`.
type NATSClusterOptions struct {
	Nodes int    // servers; 0 = 3
	Dir   string // parent of each node's JetStream store (required)
	Name  string // cluster name; "" = "loopserve"
}

// NATSCluster is a running embedded cluster whose nodes can be killed and restarted with the
// same name, ports and store, as a crashed server coming back. Safe for concurrent use.
type NATSCluster struct {
	mu      sync.Mutex
	opts    []*server.Options
	servers []*server.Server // nil while a node is down
}

// StartNATSCluster starts the nodes (JetStream fsyncing every write) and returns once every node
// accepts clients and the cluster has elected its JetStream meta leader.
func StartNATSCluster(o NATSClusterOptions) (*NATSCluster, error) {
	if o.Dir == "" {
		return nil, fmt.Errorf("starting a NATS cluster: a store directory is required")
	}
	n := cmp.Or(o.Nodes, 3)
	name := cmp.Or(o.Name, "loopserve")
	ports, err := freePorts(2 * n)
	if err != nil {
		return nil, fmt.Errorf("starting a NATS cluster: %w", err)
	}
	c := &NATSCluster{servers: make([]*server.Server, n)}
	var routes []*url.URL
	for i := range n {
		routes = append(routes, &url.URL{Scheme: "nats", Host: fmt.Sprintf("127.0.0.1:%d", ports[n+i])})
	}
	for i := range n {
		c.opts = append(c.opts, &server.Options{
			ServerName: fmt.Sprintf("n%d", i),
			Host:       "127.0.0.1",
			Port:       ports[i],
			Cluster:    server.ClusterOpts{Name: name, Host: "127.0.0.1", Port: ports[n+i]},
			Routes:     routes,
			JetStream:  true,
			StoreDir:   filepath.Join(o.Dir, fmt.Sprintf("n%d", i)),
			SyncAlways: true,
			NoSigs:     true,
			NoLog:      true,
			MaxPayload: 8 << 20,
		})
	}
	for i := range n {
		if err := c.start(i, false); err != nil {
			c.Close()
			return nil, err
		}
	}
	for i := range n {
		if !c.servers[i].ReadyForConnections(30 * time.Second) {
			c.Close()
			return nil, fmt.Errorf("starting NATS node %d: not ready after 30s", i)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for !c.hasMetaLeader() {
		if time.Now().After(deadline) {
			c.Close()
			return nil, fmt.Errorf("starting a NATS cluster: no JetStream meta leader after 30s")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return c, nil
}

func (c *NATSCluster) start(i int, wait bool) error {
	o := *c.opts[i]
	s, err := server.NewServer(&o)
	if err != nil {
		return fmt.Errorf("starting NATS node %d: %w", i, err)
	}
	s.Start()
	if wait && !s.ReadyForConnections(30*time.Second) {
		s.Shutdown()
		return fmt.Errorf("starting NATS node %d: not ready after 30s", i)
	}
	c.mu.Lock()
	c.servers[i] = s
	c.mu.Unlock()
	return nil
}

func (c *NATSCluster) hasMetaLeader() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.servers {
		if s != nil && s.JetStreamIsLeader() {
			return true
		}
	}
	return false
}

// ClientURL lists every node's client URL, comma-separated, as nats.Connect takes them.
func (c *NATSCluster) ClientURL() string {
	var urls []string
	for _, o := range c.opts {
		urls = append(urls, fmt.Sprintf("nats://127.0.0.1:%d", o.Port))
	}
	return strings.Join(urls, ",")
}

// Nodes is the number of nodes, running or not.
func (c *NATSCluster) Nodes() int { return len(c.opts) }

// Node returns the index of the node named name ("n0", ...), or -1.
func (c *NATSCluster) Node(name string) int {
	for i, o := range c.opts {
		if o.ServerName == name {
			return i
		}
	}
	return -1
}

// Running reports whether node i is up.
func (c *NATSCluster) Running(i int) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.servers[i] != nil
}

// Kill stops node i at once; its store stays for Restart.
func (c *NATSCluster) Kill(i int) {
	c.mu.Lock()
	s := c.servers[i]
	c.servers[i] = nil
	c.mu.Unlock()
	if s != nil {
		s.Shutdown()
		s.WaitForShutdown()
	}
}

// Restart starts node i again with its name, ports and store, and waits until it accepts clients.
func (c *NATSCluster) Restart(i int) error {
	if c.Running(i) {
		return nil
	}
	return c.start(i, true)
}

// Close stops every node.
func (c *NATSCluster) Close() {
	for i := range c.opts {
		c.Kill(i)
	}
}

// freePorts finds n distinct free TCP ports on 127.0.0.1.
func freePorts(n int) ([]int, error) {
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	var ports []int
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}
