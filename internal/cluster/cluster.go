// Package cluster runs a Kubernetes control plane on one machine for end-to-end tests: envtest's
// etcd and kube-apiserver (with the ServiceAccount admission plugin on and a real
// service-account signing key), plus kube-controller-manager and kube-scheduler, all from the
// folder `hack/envtest-assets.sh --cluster` fills. Deployments, ReplicaSets, service accounts
// and scheduling then behave as in a cluster; running the pods is a node agent's part.
//
// Ownership: Start owns every process it launches and their log files under Options.Dir;
// Stop ends them (SIGTERM, then SIGKILL after a grace period) and waits for each.
package cluster

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// ErrNoBinaries is returned by Start when the assets folder lacks a control-plane binary.
var ErrNoBinaries = errors.New("control-plane binaries missing")

// Binaries are the files Start needs in the assets folder.
var Binaries = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler"}

// Options configure Start.
type Options struct {
	// Assets is the folder with the binaries (KUBEBUILDER_ASSETS).
	Assets string
	// Dir holds the kubeconfig, the CA file and each process's log (<name>.log).
	Dir string
	// CRDDirectoryPaths are installed once the API server is up.
	CRDDirectoryPaths []string
	// Address is where the API server listens and what its serving certificate names, beside
	// localhost; unset means 127.0.0.1. Pods of a node agent reach the API server through a
	// podnet.Network's Gateway, so the harness sets that here (the bridge must exist first).
	Address netip.Addr
}

// Cluster is a running control plane.
type Cluster struct {
	// Config connects as an administrator (system:masters).
	Config *rest.Config
	// Kubeconfig is the path of a kubeconfig file with the same credentials, for kubectl, helm
	// and the control-plane components.
	Kubeconfig string
	// APIServer is the API server's address and port (Options.Address or 127.0.0.1).
	APIServer netip.AddrPort

	env   *envtest.Environment
	procs []*process
}

// Missing returns the binaries of Binaries absent from assets.
func Missing(assets string) []string {
	var missing []string
	for _, b := range Binaries {
		if st, err := os.Stat(filepath.Join(assets, b)); err != nil || st.IsDir() {
			missing = append(missing, b)
		}
	}
	return missing
}

// Start starts etcd and kube-apiserver (through envtest), then kube-controller-manager and
// kube-scheduler, and returns once the API server answers (the other two come up in the
// background: await what they do, checking Err). On error it stops what it started.
func Start(o Options) (*Cluster, error) {
	if m := Missing(o.Assets); len(m) > 0 {
		return nil, fmt.Errorf("%w in %q: %v (build them with hack/envtest-assets.sh --cluster)", ErrNoBinaries, o.Assets, m)
	}
	env := &envtest.Environment{
		BinaryAssetsDirectory: o.Assets,
		CRDDirectoryPaths:     o.CRDDirectoryPaths,
		ErrorIfCRDPathMissing: len(o.CRDDirectoryPaths) > 0,
	}
	api := env.ControlPlane.GetAPIServer()
	if o.Address.IsValid() {
		port, err := freePort(o.Address)
		if err != nil {
			return nil, err
		}
		// Both set, or envtest picks a loopback port; the address also goes into the serving
		// certificate's names.
		api.SecureServing.ListenAddr = envtest.ListenAddr{Address: o.Address.String(), Port: strconv.Itoa(port)}
	}
	// envtest turns the ServiceAccount admission plugin off because nothing creates the default
	// service accounts there; here the controller-manager does, so pods get their token volumes.
	api.Configure().Disable("disable-admission-plugins")
	// Node agents report an InternalIP where their kubelet API listens, and a Hostname that no
	// resolver knows: reach them by address (logs, exec and port-forward through the API server).
	api.Configure().Set("kubelet-preferred-address-types", "InternalIP,Hostname")
	cfg, err := env.Start()
	if err != nil {
		return nil, fmt.Errorf("starting etcd and kube-apiserver: %w", err)
	}
	c := &Cluster{Config: cfg, env: env}
	if c.APIServer, err = netip.ParseAddrPort(api.SecureServing.ListenAddr.HostPort()); err != nil {
		return nil, errors.Join(fmt.Errorf("parsing the API server's address: %w", err), env.Stop())
	}
	if err := c.startComponents(o, api.CertDir, api.SecureServing.CA); err != nil {
		return nil, errors.Join(err, c.Stop())
	}
	return c, nil
}

func (c *Cluster) startComponents(o Options, certDir string, ca []byte) error {
	admin, err := c.env.AddUser(envtest.User{Name: "cluster-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return fmt.Errorf("provisioning the admin user: %w", err)
	}
	kc, err := admin.KubeConfig()
	if err != nil {
		return fmt.Errorf("writing the admin kubeconfig: %w", err)
	}
	c.Kubeconfig = filepath.Join(o.Dir, "kubeconfig")
	caFile := filepath.Join(o.Dir, "ca.crt")
	if err := os.WriteFile(c.Kubeconfig, kc, 0o600); err != nil {
		return fmt.Errorf("writing %s: %w", c.Kubeconfig, err)
	}
	if err := os.WriteFile(caFile, ca, 0o600); err != nil {
		return fmt.Errorf("writing %s: %w", caFile, err)
	}
	components := []struct {
		name string
		args []string
	}{
		{"kube-controller-manager", []string{
			"--kubeconfig=" + c.Kubeconfig,
			"--authentication-kubeconfig=" + c.Kubeconfig,
			"--authorization-kubeconfig=" + c.Kubeconfig,
			"--bind-address=127.0.0.1",
			"--secure-port=0",
			"--leader-elect=false",
			// Signs the tokens of the service accounts it creates with the API server's key.
			"--service-account-private-key-file=" + filepath.Join(certDir, "sa-signer.key"),
			"--root-ca-file=" + caFile,
			"--use-service-account-credentials=false",
			"--controllers=*",
		}},
		{"kube-scheduler", []string{
			"--kubeconfig=" + c.Kubeconfig,
			"--authentication-kubeconfig=" + c.Kubeconfig,
			"--authorization-kubeconfig=" + c.Kubeconfig,
			"--bind-address=127.0.0.1",
			"--secure-port=0",
			"--leader-elect=false",
		}},
	}
	for _, comp := range components {
		p, err := startProcess(filepath.Join(o.Assets, comp.name), comp.args, filepath.Join(o.Dir, comp.name+".log"))
		if err != nil {
			return err
		}
		c.procs = append(c.procs, p)
	}
	return nil
}

// freePort returns a TCP port free on addr now.
func freePort(addr netip.Addr) (int, error) {
	l, err := net.Listen("tcp", netip.AddrPortFrom(addr, 0).String())
	if err != nil {
		return 0, fmt.Errorf("finding a free port on %s for the API server: %w", addr, err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Err reports a control-plane component that has exited (it should run until Stop), naming its
// log; nil while all run. Tests waiting on the cluster check it to fail fast with the cause.
func (c *Cluster) Err() error {
	for _, p := range c.procs {
		select {
		case <-p.done:
			return fmt.Errorf("%s exited (%v): see %s", p.name, p.err, p.log.Name())
		default:
		}
	}
	return nil
}

// Stop ends the controller-manager and the scheduler, then the API server and etcd.
func (c *Cluster) Stop() error {
	var errs []error
	for i := len(c.procs) - 1; i >= 0; i-- {
		errs = append(errs, c.procs[i].stop(10*time.Second))
	}
	c.procs = nil
	errs = append(errs, c.env.Stop())
	return errors.Join(errs...)
}

// process is a started binary; done closes when it has exited.
type process struct {
	name string
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
	err  error // of cmd.Wait, once done is closed
}

func startProcess(bin string, args []string, logPath string) (*process, error) {
	log, err := os.Create(logPath)
	if err != nil {
		return nil, fmt.Errorf("creating %s: %w", logPath, err)
	}
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, errors.Join(fmt.Errorf("starting %s: %w", bin, err), log.Close())
	}
	p := &process{name: filepath.Base(bin), cmd: cmd, log: log, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// stop sends SIGTERM, then SIGKILL after grace, and waits for the exit.
func (p *process) stop(grace time.Duration) error {
	defer p.log.Close()
	select {
	case <-p.done:
		return nil
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
	return nil
}
