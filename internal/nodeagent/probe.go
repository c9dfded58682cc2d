package nodeagent

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// probe runs the container's startup probe until it passes, then its readiness and liveness
// probes until ctx ends; a failed startup or liveness probe sends its reason on unhealthy.
// Probes reach the pod from the host as a kubelet's do: HTTP and TCP at the pod IP, exec
// commands inside the container's namespaces (nsenter into the process's mount and network
// namespaces).
func (c *container) probe(ctx context.Context, pid int, podIP string, env []string, unhealthy chan<- string) {
	check := func(p *corev1.Probe) func(context.Context) error {
		return func(ctx context.Context) error { return c.check(ctx, p, pid, podIP, env) }
	}
	if sp := c.spec.StartupProbe; sp != nil {
		passed := false
		probeLoop(ctx, sp, check(sp), func(ok bool, msg string) bool {
			if !ok {
				unhealthy <- "startup probe failed: " + msg
				return true
			}
			passed = true
			return true
		})
		if !passed {
			return
		}
		c.pod.mu.Lock()
		c.started = true
		c.ready = c.spec.ReadinessProbe == nil
		c.pod.mu.Unlock()
		c.pod.markChanged()
	}
	var wg sync.WaitGroup
	if rp := c.spec.ReadinessProbe; rp != nil {
		wg.Go(func() {
			probeLoop(ctx, rp, check(rp), func(ok bool, msg string) bool {
				if !ok {
					c.pod.logf("readiness probe failed", "container", c.spec.Name, "reason", msg)
				}
				c.pod.mu.Lock()
				changed := c.ready != ok
				c.ready = ok
				c.pod.mu.Unlock()
				if changed {
					c.pod.markChanged()
				}
				return false
			})
		})
	}
	if lp := c.spec.LivenessProbe; lp != nil {
		wg.Go(func() {
			probeLoop(ctx, lp, check(lp), func(ok bool, msg string) bool {
				if ok {
					return false
				}
				unhealthy <- "liveness probe failed: " + msg
				return true
			})
		})
	}
	wg.Wait()
}

// probeLoop runs check every period after the initial delay and calls report when the result
// crosses a threshold: ok after successThreshold successes in a row, not ok after
// failureThreshold failures in a row (the first result is reported as soon as it crosses
// either). It returns when ctx ends or report returns true.
func probeLoop(ctx context.Context, p *corev1.Probe, check func(context.Context) error, report func(ok bool, msg string) bool) {
	period := seconds(p.PeriodSeconds, 10)
	timeout := seconds(p.TimeoutSeconds, 1)
	successes, failures := int(max(p.SuccessThreshold, 1)), 3
	if p.FailureThreshold > 0 {
		failures = int(p.FailureThreshold)
	}
	delay := time.Duration(p.InitialDelaySeconds) * time.Second
	t := time.NewTimer(delay)
	defer t.Stop()
	var okRun, failRun int
	reported := 0 // 1 ok, -1 not ok
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		cctx, cancel := context.WithTimeout(ctx, timeout)
		err := check(cctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			okRun, failRun = okRun+1, 0
			if okRun >= successes && reported != 1 {
				reported = 1
				if report(true, "") {
					return
				}
			}
		} else {
			okRun, failRun = 0, failRun+1
			if failRun >= failures && reported != -1 {
				reported = -1
				if report(false, err.Error()) {
					return
				}
			}
		}
		t.Reset(period)
	}
}

func seconds(s int32, def int) time.Duration {
	if s <= 0 {
		return time.Duration(def) * time.Second
	}
	return time.Duration(s) * time.Second
}

// check runs one probe.
func (c *container) check(ctx context.Context, p *corev1.Probe, pid int, podIP string, env []string) error {
	switch {
	case p.HTTPGet != nil:
		return c.checkHTTP(ctx, p.HTTPGet, podIP)
	case p.TCPSocket != nil:
		host := p.TCPSocket.Host
		if host == "" {
			host = podIP
		}
		port, err := c.port(p.TCPSocket.Port)
		if err != nil {
			return err
		}
		var d net.Dialer
		conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(host, strconv.Itoa(port)))
		if err != nil {
			return err
		}
		return conn.Close()
	case p.Exec != nil:
		if len(p.Exec.Command) == 0 {
			return errors.New("exec probe without a command")
		}
		args := append([]string{"--target", strconv.Itoa(pid), "--mount", "--net", "--wd", "--"}, p.Exec.Command...)
		cmd := exec.CommandContext(ctx, "nsenter", args...)
		cmd.Env = env
		out, err := cmd.CombinedOutput()
		if err != nil {
			return fmt.Errorf("%q: %w: %s", p.Exec.Command, err, strings.TrimSpace(string(out)))
		}
		return nil
	case p.GRPC != nil:
		return errors.New("gRPC probes are not supported by the node agent")
	}
	return errors.New("probe without a handler")
}

func (c *container) checkHTTP(ctx context.Context, g *corev1.HTTPGetAction, podIP string) error {
	host := g.Host
	if host == "" {
		host = podIP
	}
	port, err := c.port(g.Port)
	if err != nil {
		return err
	}
	scheme := "http"
	if g.Scheme == corev1.URISchemeHTTPS {
		scheme = "https"
	}
	path := g.Path
	if !strings.HasPrefix(path, "/") {
		path = "/" + path
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, scheme+"://"+net.JoinHostPort(host, strconv.Itoa(port))+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("User-Agent", "kube-probe/1.37")
	for _, h := range g.HTTPHeaders {
		if strings.EqualFold(h.Name, "host") {
			req.Host = h.Value
			continue
		}
		req.Header.Add(h.Name, h.Value)
	}
	client := &http.Client{Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, // a kubelet does not verify probe targets either
		DisableKeepAlives: true,
	}}
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode >= 400 {
		return fmt.Errorf("HTTP probe failed with statuscode: %d", resp.StatusCode)
	}
	return nil
}

// port resolves a probe's port: a number, or the name of one of the container's ports.
func (c *container) port(p intstr.IntOrString) (int, error) {
	if p.Type == intstr.Int {
		if p.IntVal <= 0 || p.IntVal > 65535 {
			return 0, fmt.Errorf("probe port %d out of range", p.IntVal)
		}
		return int(p.IntVal), nil
	}
	for _, cp := range c.spec.Ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(p.StrVal); err == nil && n > 0 && n <= 65535 {
		return n, nil
	}
	return 0, fmt.Errorf("probe port %q: no container port of that name", p.StrVal)
}
