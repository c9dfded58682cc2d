package nodeagent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	"k8s.io/client-go/util/cert"
)

// kubeletAPI serves the part of a kubelet's API that kubectl reaches through the API server:
// logs, exec (without a TTY) and port-forward. It listens on the node's address with a
// self-signed certificate (the API server does not verify kubelets unless told to) and checks no
// credentials: it is for a test machine.
//
// Ownership: startKubeletAPI owns the listener and the server; the returned stop closes them
// and waits for the server to return.
func (a *Agent) startKubeletAPI() (port int32, stop func(), err error) {
	host := a.prov.hostIP()
	if host == "" {
		return 0, func() {}, nil // without a pod network there is no address for the API server to reach
	}
	certPEM, keyPEM, err := cert.GenerateSelfSignedCertKey(a.opts.NodeName, []net.IP{net.ParseIP(host)}, nil)
	if err != nil {
		return 0, nil, fmt.Errorf("making the kubelet API's certificate: %w", err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return 0, nil, fmt.Errorf("loading the kubelet API's certificate: %w", err)
	}
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, nil, fmt.Errorf("listening for the kubelet API: %w", err)
	}
	mux := http.NewServeMux()
	api.AttachPodRoutes(api.PodHandlerConfig{
		RunInContainer: a.execInContainer,
		AttachToContainer: func(context.Context, string, string, string, api.AttachIO) error {
			return errdefs.InvalidInput("attach is not supported by the node agent")
		},
		PortForward:           a.portForward,
		GetContainerLogs:      a.containerLogs,
		GetPods:               a.prov.GetPods,
		GetPodsFromKubernetes: a.prov.GetPods,
		StreamIdleTimeout:     30 * time.Minute,
		StreamCreationTimeout: 30 * time.Second,
	}, mux, false)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 30 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(tls.NewListener(l, &tls.Config{Certificates: []tls.Certificate{pair}})); !errors.Is(err, http.ErrServerClosed) {
			a.log.Error("kubelet API stopped", "err", err)
		}
	}()
	stop = func() {
		_ = srv.Close()
		<-done
	}
	return int32(l.Addr().(*net.TCPAddr).Port), stop, nil
}

// runningContainer finds a pod's container and the process it runs now.
func (a *Agent) runningContainer(namespace, pod, name string) (*container, int, error) {
	r := a.prov.get(namespace, pod)
	if r == nil {
		return nil, 0, errdefs.NotFoundf("pod %s/%s is not running here", namespace, pod)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, c := range append(append([]*container{}, r.mains...), r.inits...) {
		if c.spec.Name != name && name != "" {
			continue
		}
		if c.state.Running == nil || c.pid == 0 {
			return nil, 0, errdefs.InvalidInputf("container %s of pod %s/%s is not running", c.spec.Name, namespace, pod)
		}
		return c, c.pid, nil
	}
	return nil, 0, errdefs.NotFoundf("pod %s/%s has no container %q", namespace, pod, name)
}

// execInContainer runs cmd in the container's mount and network namespaces with its
// environment (no TTY).
func (a *Agent) execInContainer(ctx context.Context, namespace, pod, name string, cmd []string, attach api.AttachIO) error {
	if attach.TTY() {
		return errdefs.InvalidInput("exec with a TTY is not supported by the node agent")
	}
	if len(cmd) == 0 {
		return errdefs.InvalidInput("exec without a command")
	}
	c, pid, err := a.runningContainer(namespace, pod, name)
	if err != nil {
		return err
	}
	args := append([]string{"--target", strconv.Itoa(pid), "--mount", "--net", "--wd", "--"}, cmd...)
	x := exec.CommandContext(ctx, "nsenter", args...)
	x.Env = c.envNow()
	if in := attach.Stdin(); in != nil {
		x.Stdin = in
	}
	if out := attach.Stdout(); out != nil {
		x.Stdout = out
		defer out.Close()
	}
	if e := attach.Stderr(); e != nil {
		x.Stderr = e
		defer e.Close()
	}
	return x.Run()
}

// portForward connects stream to port on the pod's IP.
func (a *Agent) portForward(ctx context.Context, namespace, pod string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	r := a.prov.get(namespace, pod)
	if r == nil {
		return errdefs.NotFoundf("pod %s/%s is not running here", namespace, pod)
	}
	r.mu.Lock()
	ip := r.podIP
	r.mu.Unlock()
	if ip == "" {
		return errdefs.InvalidInputf("pod %s/%s has no IP yet", namespace, pod)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(ip, strconv.Itoa(int(port))))
	if err != nil {
		return fmt.Errorf("connecting to %s/%s port %d: %w", namespace, pod, port, err)
	}
	defer conn.Close()
	copied := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(conn, stream); copied <- struct{}{} }()
	go func() { _, _ = io.Copy(stream, conn); copied <- struct{}{} }()
	select {
	case <-copied:
	case <-ctx.Done():
	}
	return nil
}

// containerLogs serves a container's log file: its last Tail lines and at most LimitBytes,
// following new output with Follow until ctx ends.
func (a *Agent) containerLogs(ctx context.Context, namespace, pod, name string, opts api.ContainerLogOpts) (io.ReadCloser, error) {
	f, err := os.Open(a.LogPath(namespace, pod, name))
	if os.IsNotExist(err) {
		return nil, errdefs.NotFoundf("no log of container %s of pod %s/%s", name, namespace, pod)
	}
	if err != nil {
		return nil, err
	}
	if opts.Tail > 0 {
		if err := seekTail(f, opts.Tail); err != nil {
			f.Close()
			return nil, err
		}
	}
	var rd io.Reader = f
	if opts.Follow {
		rd = &follower{ctx: ctx, f: f}
	}
	if opts.LimitBytes > 0 {
		rd = io.LimitReader(rd, int64(opts.LimitBytes))
	}
	return struct {
		io.Reader
		io.Closer
	}{rd, f}, nil
}

// seekTail positions f at the start of its last n lines.
func seekTail(f *os.File, n int) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	const chunk = 64 << 10
	end := st.Size()
	lines := 0
	for pos := end; pos > 0; {
		size := min(int64(chunk), pos)
		pos -= size
		buf := make([]byte, size)
		if _, err := f.ReadAt(buf, pos); err != nil && err != io.EOF {
			return err
		}
		for i := len(buf) - 1; i >= 0; i-- {
			if buf[i] != '\n' || pos+int64(i) == end-1 {
				continue
			}
			if lines++; lines == n {
				_, err := f.Seek(pos+int64(i)+1, io.SeekStart)
				return err
			}
		}
	}
	_, err = f.Seek(0, io.SeekStart)
	return err
}

// follower reads a growing file until ctx ends.
type follower struct {
	ctx context.Context
	f   *os.File
}

func (r *follower) Read(p []byte) (int, error) {
	for {
		n, err := r.f.Read(p)
		if n > 0 || (err != nil && err != io.EOF) {
			return n, err
		}
		select {
		case <-r.ctx.Done():
			return 0, io.EOF
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// envNow is the environment of the container's current process.
func (c *container) envNow() []string {
	c.pod.mu.Lock()
	defer c.pod.mu.Unlock()
	return c.env
}
