package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/loopserve/loopserve/api/v1alpha1"
	"github.com/loopserve/loopserve/bus"
)

const (
	release   = "loopserve"
	releaseNS = "loopserve-system"
	model     = "ouro-tiny-arith" // the CPU sample's LoopModel, applied in the default namespace
	modelNS   = "default"
	modelID   = modelNS + "/" + model // the model name requests give
	prompt    = "a = 2 ; n = a + 7 ; b = 0 ; ? n ="
	// The sample's spec.loop: what the registry entry, the workers and the status carry.
	sampleMaxSteps  = 4
	sampleThreshold = 0.9
)

// TestQuickstart runs the README's Kubernetes quickstart on the one-machine cluster, step by
// step with the same commands: helm install with NATS on the host, kubectl apply of the CPU
// sample, requests through the gateway pod, kubectl get loopmodels, kubectl scale under load,
// a worker pod deleted mid-stream, helm upgrade, and the clean-up of the LoopModel and the
// release.
//
// There is no kube-proxy here, so requests go to the gateway pod's IP (reachable from the host
// through the pod network's bridge) rather than through its Service.
func TestQuickstart(t *testing.T) {
	h := need(t)
	h.dumpOnFailure(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	root, err := repoRoot()
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	step := func(name string) { t.Logf("%6.1fs %s", time.Since(start).Seconds(), name) }

	step("helm install")
	// --wait before any LoopModel: the operator creates the NATS buckets at start-up, so the
	// gateways turn ready without one.
	h.helmT(t, ctx, "install", release, filepath.Join(root, "charts", "loopserve"),
		"--namespace", releaseNS, "--create-namespace", "--set", "nats.url="+h.natsURL, "--wait", "--timeout", "5m")
	for _, name := range []string{"loopserve-operator", "loopserve-gateway"} {
		d, err := h.kube.AppsV1().Deployments(releaseNS).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if d.Status.ReadyReplicas != *d.Spec.Replicas || d.Status.ReadyReplicas == 0 {
			t.Fatalf("deployment %s after helm install --wait: %d of %d ready", name, d.Status.ReadyReplicas, *d.Spec.Replicas)
		}
	}

	step("kubectl apply the CPU sample")
	sample := h.sample(t, root)
	if out := h.kubectlT(t, ctx, "apply", "-n", modelNS, "-f", sample); strings.TrimSpace(out) != "loopmodel.loopserve.io/"+model+" created" {
		t.Fatalf("kubectl apply printed %q", out)
	}
	h.kubectlT(t, ctx, "wait", "-n", modelNS, "loopmodel/"+model, "--for=condition=Ready", "--timeout=5m")

	gw := h.gatewayURL(t, ctx)
	step("requests through the gateway pod " + gw)
	checkCompletion(t, ctx, gw)
	checkChatStream(t, ctx, gw)

	step("kubectl get loopmodels")
	h.checkPrinterColumns(t, ctx, 1)

	step("kubectl scale to 2 workers under a trickle of requests")
	first := h.workerPods(t, ctx)
	if len(first) != 1 {
		t.Fatalf("worker pods before scaling: %v, want 1", podNames(first))
	}
	stats := h.subscribeStats(t)
	tr := startTrickle(ctx, gw)
	t.Cleanup(func() { tr.stop() }) // when the test fails before the stop below
	if out := h.kubectlT(t, ctx, "scale", "-n", modelNS, "loopmodel/"+model, "--replicas", "2"); strings.TrimSpace(out) != "loopmodel.loopserve.io/"+model+" scaled" {
		t.Fatalf("kubectl scale printed %q", out)
	}
	second := h.awaitNewWorkerServing(t, ctx, first[0].Name)
	codes := tr.stop()
	checkAllOK(t, codes)
	step(fmt.Sprintf("the new worker %s served; %d requests during the scale-up, all 200", second.Name, len(codes)))
	h.awaitReadyReplicas(t, ctx, 2)
	awaitStatsFrom(t, ctx, stats, second.Name)
	h.checkPrinterColumns(t, ctx, 2)

	step("delete the worker pod serving a stream")
	h.deleteWorkerMidStream(t, ctx, gw)

	step("helm upgrade --reuse-values")
	h.helmT(t, ctx, "upgrade", release, filepath.Join(root, "charts", "loopserve"), "-n", releaseNS, "--reuse-values", "--wait", "--timeout", "5m")
	if out := h.helmT(t, ctx, "status", release, "-n", releaseNS, "-o", "json"); !strings.Contains(out, `"version":2`) || !strings.Contains(out, `"status":"deployed"`) {
		t.Fatalf("helm status after the upgrade, want revision 2 deployed:\n%s", out)
	}
	checkCompletion(t, ctx, h.gatewayURL(t, ctx))

	step("kubectl delete the LoopModel, helm uninstall")
	h.cleanUp(t, ctx)
	step("done")
}

// sample writes the shipped CPU sample with its hostPath pointed at a copy of the shipped tiny
// model, and nothing else changed.
func (h *harness) sample(t *testing.T, root string) string {
	t.Helper()
	models := filepath.Join(h.dir, "models")
	if err := os.CopyFS(filepath.Join(models, model), os.DirFS(filepath.Join(root, "testdata", "models", model))); err != nil {
		t.Fatalf("copying the shipped model: %v", err)
	}
	b, err := os.ReadFile(filepath.Join(root, "config", "samples", "loopserve_v1alpha1_loopmodel_cpu.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	const shipped = "path: /var/lib/loopserve/models"
	if n := bytes.Count(b, []byte(shipped)); n != 1 {
		t.Fatalf("the CPU sample holds %q %d times, want once", shipped, n)
	}
	path := filepath.Join(h.dir, "loopmodel_cpu.yaml")
	if err := os.WriteFile(path, bytes.Replace(b, []byte(shipped), []byte("path: "+models), 1), 0o644); err != nil {
		t.Fatal(err)
	}
	return path
}

// gatewayURL is the first gateway pod's address, as the quickstart reads it with kubectl.
func (h *harness) gatewayURL(t *testing.T, ctx context.Context) string {
	t.Helper()
	ip := h.kubectlT(t, ctx, "get", "pods", "-n", releaseNS, "-l", "app.kubernetes.io/name=loopserve-gateway",
		"-o", "jsonpath={.items[0].status.podIP}")
	if ip == "" {
		t.Fatal("the gateway pod has no IP")
	}
	return "http://" + ip + ":8080"
}

// completion is the part of an OpenAI answer (or stream chunk) the tests read.
type completion struct {
	Choices []struct {
		Text         string  `json:"text"`
		FinishReason *string `json:"finish_reason"`
		Message      *struct {
			Role    string `json:"role"`
			Content string `json:"content"`
		} `json:"message"`
		Delta *struct {
			Content string `json:"content"`
		} `json:"delta"`
		LoopDepths []int `json:"loop_depths"`
	} `json:"choices"`
	Usage *struct {
		CompletionTokens int `json:"completion_tokens"`
	} `json:"usage"`
	Error *struct {
		Message string `json:"message"`
	} `json:"error"`
}

func postJSON(ctx context.Context, url string, body any) (*http.Response, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	return http.DefaultClient.Do(req)
}

// checkCompletion sends a /v1/completions request and checks its answer: text, usage and one
// loop depth per token within the sample's maxSteps.
func checkCompletion(t *testing.T, ctx context.Context, gw string) {
	t.Helper()
	resp, err := postJSON(ctx, gw+"/v1/completions", map[string]any{"model": modelID, "prompt": prompt, "max_tokens": 8})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("POST /v1/completions: %d %s", resp.StatusCode, body)
	}
	var c completion
	if err := json.Unmarshal(body, &c); err != nil {
		t.Fatalf("decoding %s: %v", body, err)
	}
	if len(c.Choices) != 1 || c.Usage == nil || c.Usage.CompletionTokens == 0 || c.Choices[0].FinishReason == nil {
		t.Fatalf("completion = %s, want one finished choice and its usage", body)
	}
	ch := c.Choices[0]
	if len(ch.LoopDepths) != c.Usage.CompletionTokens {
		t.Errorf("%d loop depths for %d tokens: %s", len(ch.LoopDepths), c.Usage.CompletionTokens, body)
	}
	for _, d := range ch.LoopDepths {
		if d < 1 || d > sampleMaxSteps {
			t.Errorf("loop depth %d outside 1..%d (the sample's maxSteps): %s", d, sampleMaxSteps, body)
		}
	}
}

// stream reads a server-sent event stream of chunks until [DONE]; onChunk sees each chunk.
type streamResult struct {
	chunks  int
	text    string
	finish  string
	done    bool // [DONE] arrived
	errText string
}

func readStream(body io.Reader, onChunk func(n int)) (streamResult, error) {
	var r streamResult
	sc := bufio.NewScanner(body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		data, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok {
			continue
		}
		if data == "[DONE]" {
			r.done = true
			break
		}
		var c completion
		if err := json.Unmarshal([]byte(data), &c); err != nil {
			return r, fmt.Errorf("decoding chunk %q: %w", data, err)
		}
		if c.Error != nil {
			r.errText = c.Error.Message
			continue
		}
		for _, ch := range c.Choices {
			r.text += ch.Text
			if ch.Delta != nil {
				r.text += ch.Delta.Content
			}
			if ch.FinishReason != nil {
				r.finish = *ch.FinishReason
			}
		}
		r.chunks++
		if onChunk != nil {
			onChunk(r.chunks)
		}
	}
	return r, sc.Err()
}

// checkChatStream sends a streaming /v1/chat/completions request and checks the stream: chunks
// of content, a finish reason, no error, [DONE].
func checkChatStream(t *testing.T, ctx context.Context, gw string) {
	t.Helper()
	resp, err := postJSON(ctx, gw+"/v1/chat/completions", map[string]any{"model": modelID, "stream": true, "max_tokens": 16,
		"messages": []map[string]string{{"role": "user", "content": prompt}}})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("POST /v1/chat/completions stream: %d %s %s", resp.StatusCode, resp.Header.Get("Content-Type"), b)
	}
	r, err := readStream(resp.Body, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !r.done || r.errText != "" || r.finish == "" || r.chunks < 2 || r.text == "" {
		t.Fatalf("chat stream = %+v, want content chunks, a finish reason, no error and [DONE]", r)
	}
}

// checkPrinterColumns waits for the workers' statistics to reach the status, then reads
// `kubectl get loopmodels` and compares each printer column with the status it shows.
func (h *harness) checkPrinterColumns(t *testing.T, ctx context.Context, replicas int) {
	t.Helper()
	var lm v1alpha1.LoopModel
	await(t, ctx, "status.observed with a mean depth and a P95", func() (bool, error) {
		if err := h.k8s.Get(ctx, client.ObjectKey{Namespace: modelNS, Name: model}, &lm); err != nil {
			return false, err
		}
		o := lm.Status.Observed
		return o != nil && o.MeanDepth > 0 && o.TokenLatencyP95 != nil, nil
	})
	out := h.kubectlT(t, ctx, "get", "loopmodels", "-A")
	rows := parseTable(t, out)
	if len(rows) != 1 {
		t.Fatalf("kubectl get loopmodels:\n%s\nwant one row", out)
	}
	// Read again: a reconcile may have refreshed the statistics between the two reads.
	if err := h.k8s.Get(ctx, client.ObjectKey{Namespace: modelNS, Name: model}, &lm); err != nil {
		t.Fatal(err)
	}
	got := rows[0]
	age := got["AGE"]
	delete(got, "AGE")
	want := map[string]string{
		"NAMESPACE":  modelNS,
		"NAME":       model,
		"READY":      "True",
		"REPLICAS":   strconv.Itoa(replicas),
		"THRESHOLD":  strconv.FormatFloat(sampleThreshold, 'g', -1, 64),
		"MEAN DEPTH": strconv.FormatFloat(lm.Status.Observed.MeanDepth, 'g', -1, 64),
		"P95":        lm.Status.Observed.TokenLatencyP95.Duration.String(),
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("kubectl get loopmodels (-got +want):\n%s\n%s", diff, out)
	}
	if d := lm.Status.Observed.MeanDepth; d < 1 || d > sampleMaxSteps {
		t.Errorf("mean depth %v outside 1..%d", d, sampleMaxSteps)
	}
	if p := lm.Status.Observed.TokenLatencyP95.Duration; p <= 0 || p > time.Minute {
		t.Errorf("token latency P95 %v, want a positive latency", p)
	}
	if age == "" {
		t.Errorf("no AGE column:\n%s", out)
	}
}

// parseTable splits kubectl's table output into rows keyed by header; columns are found where
// each header word starts (headers such as "MEAN DEPTH" hold a space).
func parseTable(t *testing.T, out string) []map[string]string {
	t.Helper()
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	header := lines[0]
	type col struct {
		name  string
		start int
	}
	var cols []col
	for i := 0; i < len(header); {
		if header[i] == ' ' {
			i++
			continue
		}
		// A column name ends at two spaces (or the line's end).
		end := strings.Index(header[i:], "  ")
		if end < 0 {
			end = len(header) - i
		}
		cols = append(cols, col{strings.TrimSpace(header[i : i+end]), i})
		i += end
	}
	var rows []map[string]string
	for _, line := range lines[1:] {
		row := map[string]string{}
		for j, c := range cols {
			end := len(line)
			if j+1 < len(cols) {
				end = min(cols[j+1].start, len(line))
			}
			if c.start < len(line) {
				row[c.name] = strings.TrimSpace(line[c.start:end])
			} else {
				row[c.name] = ""
			}
		}
		rows = append(rows, row)
	}
	return rows
}

// workerPods are the LoopModel's worker pods that are not being deleted, oldest first.
func (h *harness) workerPods(t *testing.T, ctx context.Context) []corev1.Pod {
	t.Helper()
	pods, err := h.kube.CoreV1().Pods(modelNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=" + model})
	if err != nil {
		t.Fatal(err)
	}
	var out []corev1.Pod
	for _, p := range pods.Items {
		if p.DeletionTimestamp == nil {
			out = append(out, p)
		}
	}
	return out
}

func podNames(pods []corev1.Pod) []string {
	var names []string
	for _, p := range pods {
		names = append(names, p.Name)
	}
	return names
}

func podReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// workerMetric sums a metric's samples on a worker pod's /metrics (port 9090, named metrics).
func workerMetric(ctx context.Context, p *corev1.Pod, name string) (float64, error) {
	if p.Status.PodIP == "" {
		return 0, fmt.Errorf("pod %s has no IP", p.Name)
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+p.Status.PodIP+":9090/metrics", nil)
	if err != nil {
		return 0, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err != nil {
			return 0, fmt.Errorf("metric line %q: %w", line, err)
		}
		sum += v
	}
	return sum, sc.Err()
}

// trickle sends one small completion after another until stopped, keeping every status code.
type trickle struct {
	cancel context.CancelFunc
	wg     sync.WaitGroup
	mu     sync.Mutex
	codes  []string // "200", or the failure
}

func startTrickle(ctx context.Context, gw string) *trickle {
	ctx, cancel := context.WithCancel(ctx)
	tr := &trickle{cancel: cancel}
	tr.wg.Go(func() {
		for ctx.Err() == nil {
			// Requests already sent run to their end: stopping only stops new ones.
			rctx, rcancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
			resp, err := postJSON(rctx, gw+"/v1/completions", map[string]any{"model": modelID, "prompt": prompt, "max_tokens": 8})
			code := ""
			if err != nil {
				code = err.Error()
			} else {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				code = strconv.Itoa(resp.StatusCode)
				if resp.StatusCode != http.StatusOK {
					code += " " + string(b)
				}
			}
			rcancel()
			tr.mu.Lock()
			tr.codes = append(tr.codes, code)
			tr.mu.Unlock()
			select {
			case <-ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
	})
	return tr
}

func (tr *trickle) stop() []string {
	tr.cancel()
	tr.wg.Wait()
	tr.mu.Lock()
	defer tr.mu.Unlock()
	return tr.codes
}

func checkAllOK(t *testing.T, codes []string) {
	t.Helper()
	if len(codes) == 0 {
		t.Fatal("no request was sent")
	}
	var failed []string
	for _, c := range codes {
		if c != "200" {
			failed = append(failed, c)
		}
	}
	if len(failed) > 0 {
		t.Errorf("%d of %d requests failed: %q", len(failed), len(codes), failed)
	}
}

// awaitNewWorkerServing waits for a worker pod other than old to be ready and to have generated
// tokens (it took requests from the queue), and returns it.
func (h *harness) awaitNewWorkerServing(t *testing.T, ctx context.Context, old string) *corev1.Pod {
	t.Helper()
	var found *corev1.Pod
	await(t, ctx, "a second worker pod, ready, that generated tokens", func() (bool, error) {
		for _, p := range h.workerPods(t, ctx) {
			if p.Name == old || !podReady(&p) {
				continue
			}
			n, err := workerMetric(ctx, &p, "loopserve_generated_tokens_total")
			if err != nil {
				return false, err
			}
			if n > 0 {
				found = &p
				return true, nil
			}
		}
		return false, nil
	})
	return found
}

func (h *harness) awaitReadyReplicas(t *testing.T, ctx context.Context, n int32) {
	t.Helper()
	await(t, ctx, fmt.Sprintf("status.readyReplicas %d", n), func() (bool, error) {
		var lm v1alpha1.LoopModel
		if err := h.k8s.Get(ctx, client.ObjectKey{Namespace: modelNS, Name: model}, &lm); err != nil {
			return false, err
		}
		return lm.Status.ReadyReplicas == n, nil
	})
}

// longPrompt is a program of 300 assignments (about 1,200 tokens): the shipped model answers
// any prompt within a few dozen tokens, so a long context is what keeps a stream going for a
// while (each token attends to all of it, at every loop step).
var longPrompt = func() string {
	var b strings.Builder
	for i := range 300 {
		fmt.Fprintf(&b, "%c = %d ; ", 'a'+i%26, i%10)
	}
	return b.String() + "? a ="
}()

// deleteWorkerMidStream starts a long stream, finds the worker pod generating it (the one with
// a request in flight), deletes that pod once the first chunk has arrived, and checks that the
// stream still runs to its end with chunks after the deletion: the worker drains on SIGTERM.
// The Deployment then replaces the pod. The deletion goes through client-go, so that it lands
// within milliseconds of the first chunk.
func (h *harness) deleteWorkerMidStream(t *testing.T, ctx context.Context, gw string) {
	t.Helper()
	type result struct {
		r   streamResult
		err error
	}
	firstChunk := make(chan struct{})
	done := make(chan result, 1)
	var once sync.Once
	var mu sync.Mutex
	var chunks int
	go func() {
		resp, err := postJSON(ctx, gw+"/v1/completions", map[string]any{"model": modelID, "prompt": longPrompt, "stream": true,
			"max_tokens": 400, "n": 4, "temperature": 1, "seed": 1, "exit_threshold": 1})
		if err != nil {
			done <- result{err: err}
			return
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b, _ := io.ReadAll(resp.Body)
			done <- result{err: fmt.Errorf("POST /v1/completions stream: %d %s", resp.StatusCode, b)}
			return
		}
		r, err := readStream(resp.Body, func(n int) {
			mu.Lock()
			chunks = n
			mu.Unlock()
			once.Do(func() { close(firstChunk) })
		})
		done <- result{r, err}
	}()
	// The prompt's prefill takes a while: the serving worker is found before the first chunk.
	var serving *corev1.Pod
	await(t, ctx, "the worker pod generating the stream", func() (bool, error) {
		select {
		case res := <-done:
			return false, fmt.Errorf("%w: the stream ended before its worker was found: %+v %v", errGiveUp, res.r, res.err)
		default:
		}
		for _, p := range h.workerPods(t, ctx) {
			n, err := workerMetric(ctx, &p, "loopserve_inflight_requests")
			if err != nil {
				return false, err
			}
			if n > 0 {
				serving = &p
				return true, nil
			}
		}
		return false, nil
	})
	var res result
	select {
	case <-firstChunk:
	case res = <-done:
		t.Fatalf("the stream ended before its first chunk: %+v %v", res.r, res.err)
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	if err := h.kube.CoreV1().Pods(modelNS).Delete(ctx, serving.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	atDelete := chunks
	mu.Unlock()
	select {
	case res = <-done:
	case <-ctx.Done():
		t.Fatal(ctx.Err())
	}
	if res.err != nil {
		t.Fatal(res.err)
	}
	t.Logf("stream: %d chunks when %s was deleted, %d in all, finish %q", atDelete, serving.Name, res.r.chunks, res.r.finish)
	if res.r.chunks <= atDelete {
		t.Fatalf("the stream had %d chunks at the deletion and %d at its end: it did not outlive the deletion", atDelete, res.r.chunks)
	}
	if !res.r.done || res.r.errText != "" || res.r.finish == "" {
		t.Errorf("stream after deleting its worker %s = %d chunks, finish %q, error %q, [DONE] %v; want it finished without error",
			serving.Name, res.r.chunks, res.r.finish, res.r.errText, res.r.done)
	}
	await(t, ctx, "the deleted worker pod gone", func() (bool, error) {
		_, err := h.kube.CoreV1().Pods(modelNS).Get(ctx, serving.Name, metav1.GetOptions{})
		return apierrors.IsNotFound(err), client.IgnoreNotFound(err)
	})
	h.awaitReadyReplicas(t, ctx, 2)
}

// natsConn connects to the host's NATS server, as the operator does, until the test ends.
func (h *harness) natsConn(t *testing.T) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(h.natsURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// subscribeStats returns the stats snapshots the LoopModel's workers publish from now on.
func (h *harness) subscribeStats(t *testing.T) <-chan *nats.Msg {
	t.Helper()
	ch := make(chan *nats.Msg, 256)
	sub, err := h.natsConn(t).ChanSubscribe(bus.Ref{Namespace: modelNS, Name: model}.StatsSubject(), ch)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	return ch
}

// awaitStatsFrom waits for a stats snapshot published by the worker of pod: the worker reports
// to the operator under its pod's name.
func awaitStatsFrom(t *testing.T, ctx context.Context, stats <-chan *nats.Msg, pod string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	var seen []string
	for {
		select {
		case m := <-stats:
			s, err := bus.DecodeStats(m.Data)
			if err != nil {
				t.Fatalf("a worker published an invalid stats snapshot: %v", err)
			}
			if s.Worker == pod {
				if s.Namespace != modelNS || s.Name != model || s.MaxSteps != sampleMaxSteps {
					t.Errorf("stats snapshot of %s = %s/%s with maxSteps %d, want %s/%s with %d", pod, s.Namespace, s.Name, s.MaxSteps, modelNS, model, sampleMaxSteps)
				}
				return
			}
			seen = append(seen, s.Worker)
		case <-ctx.Done():
			t.Fatalf("no stats snapshot from %s (snapshots came from %v)", pod, seen)
		}
	}
}

// cleanUp deletes the LoopModel (the operator removes its queue and registry entry, then its
// finalizer) and uninstalls the release, and checks NATS and the namespace are left clean.
func (h *harness) cleanUp(t *testing.T, ctx context.Context) {
	t.Helper()
	js, err := jetstream.New(h.natsConn(t))
	if err != nil {
		t.Fatal(err)
	}
	ref := bus.Ref{Namespace: modelNS, Name: model}
	kv, err := bus.OpenRegistry(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := js.Stream(ctx, ref.Stream()); err != nil {
		t.Fatalf("the work queue %s before deletion: %v", ref.Stream(), err)
	}
	if _, err := kv.Get(ctx, ref.Key()); err != nil {
		t.Fatalf("the registry entry %s before deletion: %v", ref.Key(), err)
	}

	h.kubectlT(t, ctx, "delete", "loopmodels", "--all", "-A", "--timeout=2m")
	if _, err := js.Stream(ctx, ref.Stream()); !errors.Is(err, jetstream.ErrStreamNotFound) {
		t.Errorf("the work queue %s after deleting the LoopModel: %v, want it gone", ref.Stream(), err)
	}
	if _, err := kv.Get(ctx, ref.Key()); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Errorf("the registry entry %s after deleting the LoopModel: %v, want it gone", ref.Key(), err)
	}
	await(t, ctx, "the worker pods gone", func() (bool, error) {
		pods, err := h.kube.CoreV1().Pods(modelNS).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/instance=" + model})
		return err == nil && len(pods.Items) == 0, err
	})

	h.helmT(t, ctx, "uninstall", release, "--namespace", releaseNS, "--wait", "--timeout", "2m")
	await(t, ctx, "the release's pods gone", func() (bool, error) {
		pods, err := h.kube.CoreV1().Pods(releaseNS).List(ctx, metav1.ListOptions{})
		return err == nil && len(pods.Items) == 0, err
	})
	if out := h.kubectlT(t, ctx, "get", "loopmodels", "-A", "-o", "name"); out != "" {
		t.Errorf("LoopModels left: %s", out)
	}
}

// errGiveUp, wrapped in a condition's error, makes await fail at once.
var errGiveUp = errors.New("giving up")

// await polls cond until it holds, failing the test with what was awaited, the last error and
// any control-plane component that exited, when ctx ends first (or after three minutes), or
// when cond returns an error wrapping errGiveUp.
func await(t *testing.T, ctx context.Context, what string, cond func() (bool, error)) {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	var last error
	for {
		ok, err := cond()
		if ok {
			return
		}
		if errors.Is(err, errGiveUp) {
			t.Fatalf("awaiting %s: %v", what, err)
		}
		if err != nil {
			last = err
		}
		if cerr := env.cluster.Err(); cerr != nil {
			t.Fatalf("awaiting %s: %v", what, cerr)
		}
		select {
		case <-ctx.Done():
			t.Fatalf("awaiting %s: %v (last error: %v)", what, ctx.Err(), last)
		case <-time.After(250 * time.Millisecond):
		}
	}
}
