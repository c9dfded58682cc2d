// Package e2e holds the end-to-end tests: the README's Kubernetes quickstart run literally (helm,
// kubectl) on a one-machine cluster — internal/cluster's control plane, internal/nodeagent's
// nodes running every container as a local loopserve process in its own network namespace
// (images are ignored), and NATS with JetStream on the host. `make e2e` runs them; without the
// cluster binaries, kubectl, helm or network namespaces they skip with the reason printed, and
// LOOPSERVE_E2E_REQUIRED=1 (set by .ci/run) turns that skip into a failure.
package e2e
