// Package sim is the tuner benchmark's discrete-time model of a LoopModel under load: replicas
// with a cold-start delay, step-level batching (one engine iteration runs one loop step of every
// running request and costs StepBase + StepPerRow·rows), per-token depth drawn from
// ouro-tiny-arith's measured c_t (profile.json, written by hack/tunerprofile on the real
// engine), and agreement with full depth from the same tokens. It runs five autoscaling
// policies on one trace with the same SLO and cold start; the joint policy is gatepolicy.Tuner,
// the code the operator runs.
package sim

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"math"

	"github.com/loopserve/loopserve/gatepolicy"
)

//go:embed profile.json
var profileJSON []byte

// Profile is the measured depth behaviour of a model: per token its c_t after each loop step
// (×1000) and a bit per step set when that step's argmax equals the full-depth one; and one
// engine iteration's cost.
type Profile struct {
	Model      string  `json:"model"`
	MaxSteps   int     `json:"maxSteps"`
	StepBase   float64 `json:"stepBaseSeconds"`
	StepPerRow float64 `json:"stepPerRowSeconds"`
	Cum        [][]int `json:"cum"`
	Agree      []int   `json:"agree"`

	byTau []tauStats // per grid τ (index = τ·Bins)
}

// tauStats is what a threshold gives on the profile's tokens.
type tauStats struct {
	depthP    []float64 // P(depth = d+1)
	meanDepth float64
	agreement float64
}

// LoadProfile parses a profile and precomputes its tables.
func LoadProfile(b []byte) (*Profile, error) {
	var p Profile
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, fmt.Errorf("decoding depth profile: %w", err)
	}
	if p.MaxSteps < 1 || p.MaxSteps > 64 || len(p.Cum) == 0 || len(p.Cum) != len(p.Agree) || !(p.StepBase > 0) || !(p.StepPerRow > 0) {
		return nil, fmt.Errorf("depth profile: %d steps, %d tokens, %d agreement entries, step cost %v + %v·rows", p.MaxSteps, len(p.Cum), len(p.Agree), p.StepBase, p.StepPerRow)
	}
	for i, c := range p.Cum {
		if len(c) != p.MaxSteps {
			return nil, fmt.Errorf("depth profile: token %d has %d steps, want %d", i, len(c), p.MaxSteps)
		}
	}
	p.byTau = make([]tauStats, gatepolicy.Bins+1)
	for k := range p.byTau {
		tau := float64(k) / gatepolicy.Bins
		st := tauStats{depthP: make([]float64, p.MaxSteps)}
		for i := range p.Cum {
			d := p.exit(i, tau)
			st.depthP[d-1]++
			st.meanDepth += float64(d)
			if p.Agree[i]>>(d-1)&1 == 1 {
				st.agreement++
			}
		}
		n := float64(len(p.Cum))
		for d := range st.depthP {
			st.depthP[d] /= n
		}
		st.meanDepth /= n
		st.agreement /= n
		p.byTau[k] = st
	}
	return &p, nil
}

// DefaultProfile is the committed ouro-tiny-arith profile.
func DefaultProfile() *Profile {
	p, err := LoadProfile(profileJSON)
	if err != nil {
		panic(err) // the embedded file is checked by the tests
	}
	return p
}

// exit is token i's depth under the Q-exit rule at tau.
func (p *Profile) exit(i int, tau float64) int {
	for t, c := range p.Cum[i] {
		if float64(c) >= tau*1000-1e-9 {
			return t + 1
		}
	}
	return p.MaxSteps
}

func (p *Profile) at(tau float64) tauStats {
	k := int(math.Round(tau * gatepolicy.Bins))
	return p.byTau[min(max(k, 0), gatepolicy.Bins)]
}

// MeanDepth is the mean depth at tau on the profile's tokens.
func (p *Profile) MeanDepth(tau float64) float64 { return p.at(tau).meanDepth }

// Agreement is the share of the profile's tokens whose token at their exit step under tau
// equals the full-depth one.
func (p *Profile) Agreement(tau float64) float64 { return p.at(tau).agreement }

// StepTime is one iteration's wall time with rows requests in the batch.
func (p *Profile) StepTime(rows int) float64 { return p.StepBase + p.StepPerRow*float64(rows) }
