package nodeagent

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"

	authv1 "k8s.io/api/authentication/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// helperArg, as the first argument, makes the test binary one of the pods' programs: the pods
// the tests create run it (an empty command runs Options.Binary, which is this binary).
const helperArg = "nodeagent-helper"

// helper runs one program:
//
//	serve ADDR [MARKER [ignore-term]]  HTTP on ADDR: /healthz, /pid, /env (JSON), /read?path=,
//	                                   /whoami (an in-cluster client's SelfSubjectReview). On
//	                                   SIGTERM it writes "SIGTERM" to MARKER (when given) and
//	                                   exits 0, or keeps serving with ignore-term.
//	exit CODE [MESSAGE]                writes MESSAGE to /dev/termination-log, then exits CODE.
//	stderr CODE LINE                   prints LINE on stderr, then exits CODE.
func helper(args []string) int {
	if len(args) == 0 {
		fmt.Fprintln(os.Stderr, "helper: no program")
		return 2
	}
	switch args[0] {
	case "serve":
		return serve(args[1:])
	case "exit":
		code, _ := strconv.Atoi(args[1])
		if len(args) > 2 {
			if err := os.WriteFile("/dev/termination-log", []byte(args[2]), 0o644); err != nil {
				fmt.Fprintln(os.Stderr, err)
			}
		}
		return code
	case "stderr":
		code, _ := strconv.Atoi(args[1])
		fmt.Fprintln(os.Stderr, "first line")
		fmt.Fprintln(os.Stderr, args[2])
		return code
	}
	fmt.Fprintln(os.Stderr, "helper: unknown program", args[0])
	return 2
}

func serve(args []string) int {
	addr := args[0]
	marker, ignore := "", false
	if len(args) > 1 {
		marker = args[1]
	}
	if len(args) > 2 {
		ignore = args[2] == "ignore-term"
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM)
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "ok") })
	mux.HandleFunc("/pid", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, os.Getpid()) })
	mux.HandleFunc("/env", func(w http.ResponseWriter, r *http.Request) {
		env := map[string]string{}
		for _, kv := range os.Environ() {
			k, v, _ := strings.Cut(kv, "=")
			env[k] = v
		}
		_ = json.NewEncoder(w).Encode(env)
	})
	mux.HandleFunc("/read", func(w http.ResponseWriter, r *http.Request) {
		p := r.URL.Query().Get("path")
		b, err := os.ReadFile(p)
		if err != nil {
			http.Error(w, err.Error(), http.StatusNotFound)
			return
		}
		st, _ := os.Stat(p)
		w.Header().Set("X-Mode", fmt.Sprintf("%o", st.Mode().Perm()))
		_, _ = w.Write(b)
	})
	mux.HandleFunc("/write", func(w http.ResponseWriter, r *http.Request) {
		if err := os.WriteFile(r.URL.Query().Get("path"), []byte("written"), 0o644); err != nil {
			http.Error(w, err.Error(), http.StatusForbidden)
		}
	})
	mux.HandleFunc("/whoami", func(w http.ResponseWriter, r *http.Request) {
		cfg, err := rest.InClusterConfig()
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		cs, err := kubernetes.NewForConfig(cfg)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		rev, err := cs.AuthenticationV1().SelfSubjectReviews().Create(r.Context(), &authv1.SelfSubjectReview{}, metav1.CreateOptions{})
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		fmt.Fprint(w, rev.Status.UserInfo.Username)
	})
	srv := &http.Server{Addr: addr, Handler: mux}
	errs := make(chan error, 1)
	go func() { errs <- srv.ListenAndServe() }()
	for {
		select {
		case err := <-errs:
			fmt.Fprintln(os.Stderr, err)
			return 1
		case <-sigs:
			fmt.Fprintln(os.Stderr, "got SIGTERM")
			if marker != "" {
				if err := os.WriteFile(marker, []byte("SIGTERM"), 0o644); err != nil {
					fmt.Fprintln(os.Stderr, err)
				}
			}
			if !ignore {
				_ = srv.Shutdown(context.Background())
				return 0
			}
		}
	}
}
