package bus

import (
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
)

// ErrUnknownTier reports a quality tier the LoopModel does not declare.
var ErrUnknownTier = errors.New("unknown quality tier")

// MaxTierName bounds a tier name: a DNS label, so it is safe as a header value, a Prometheus
// label value and a JSON key.
const MaxTierName = 63

var tierName = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)

// ValidTierName reports whether s can name a quality tier (a DNS label).
func ValidTierName(s string) bool { return len(s) <= MaxTierName && tierName.MatchString(s) }

// Thresholds is the exit threshold τ in force of a LoopModel: one per quality tier. A model
// without tiers has one implicit tier named "": Tiers is empty, DefaultTier is "" and
// ExitThreshold is its τ. With tiers, Tiers holds every tier's τ, DefaultTier names the tier of
// requests that choose none, and ExitThreshold repeats that tier's τ for readers that know no
// tiers. Control messages and registry entries carry it.
type Thresholds struct {
	ExitThreshold float64            `json:"exitThreshold"`
	DefaultTier   string             `json:"defaultTier,omitempty"`
	Tiers         map[string]float64 `json:"tiers,omitempty"`
}

// Validate checks that every τ lies in (0, 1], that tier names are DNS labels, and that
// DefaultTier names a tier whose τ is ExitThreshold.
func (t Thresholds) Validate() error {
	if !in01(t.ExitThreshold) {
		return fmt.Errorf("exitThreshold %v outside (0, 1]", t.ExitThreshold)
	}
	if len(t.Tiers) == 0 {
		if t.DefaultTier != "" {
			return fmt.Errorf("defaultTier %q without tiers", t.DefaultTier)
		}
		return nil
	}
	for _, name := range slices.Sorted(maps.Keys(t.Tiers)) {
		if !ValidTierName(name) {
			return fmt.Errorf("tier name %q is not a DNS label", name)
		}
		if tau := t.Tiers[name]; !in01(tau) {
			return fmt.Errorf("tier %q: exitThreshold %v outside (0, 1]", name, tau)
		}
	}
	def, ok := t.Tiers[t.DefaultTier]
	if !ok {
		return fmt.Errorf("defaultTier %q is not one of the tiers %v", t.DefaultTier, t.TierNames())
	}
	if def != t.ExitThreshold {
		return fmt.Errorf("exitThreshold %v differs from the default tier %q's %v", t.ExitThreshold, t.DefaultTier, def)
	}
	return nil
}

// Threshold returns the τ in force for a tier ("" means the default tier) and the tier's name;
// a tier the model does not declare is ErrUnknownTier.
func (t Thresholds) Threshold(tier string) (string, float64, error) {
	if tier == "" {
		tier = t.DefaultTier
	}
	if len(t.Tiers) == 0 {
		if tier != "" {
			return "", 0, fmt.Errorf("%w %q: the model declares no tiers", ErrUnknownTier, tier)
		}
		return "", t.ExitThreshold, nil
	}
	tau, ok := t.Tiers[tier]
	if !ok {
		return "", 0, fmt.Errorf("%w %q: known tiers are %v", ErrUnknownTier, tier, t.TierNames())
	}
	return tier, tau, nil
}

// TierNames lists the declared tiers, sorted (empty without tiers).
func (t Thresholds) TierNames() []string { return slices.Sorted(maps.Keys(t.Tiers)) }

// Equal reports whether two sets of thresholds are the same, τ compared within 1e-9 (they
// round-trip through JSON).
func (t Thresholds) Equal(o Thresholds) bool {
	if !near(t.ExitThreshold, o.ExitThreshold) || t.DefaultTier != o.DefaultTier || len(t.Tiers) != len(o.Tiers) {
		return false
	}
	for k, v := range t.Tiers {
		w, ok := o.Tiers[k]
		if !ok || !near(v, w) {
			return false
		}
	}
	return true
}

func near(a, b float64) bool { return a-b < 1e-9 && b-a < 1e-9 }

func in01(x float64) bool { return x > 0 && x <= 1 }

// PerTier returns τ per tier keyed as gatepolicy keys tiers: the declared tiers, or
// {"": ExitThreshold} for a model without tiers. The map is a copy.
func (t Thresholds) PerTier() map[string]float64 {
	if len(t.Tiers) == 0 {
		return map[string]float64{"": t.ExitThreshold}
	}
	return maps.Clone(t.Tiers)
}

// With returns t with each tier's τ taken from taus (keyed as PerTier's; tiers absent from
// taus keep theirs), ExitThreshold following the default tier.
func (t Thresholds) With(taus map[string]float64) Thresholds {
	out := Thresholds{ExitThreshold: t.ExitThreshold, DefaultTier: t.DefaultTier}
	if len(t.Tiers) == 0 {
		if v, ok := taus[""]; ok {
			out.ExitThreshold = v
		}
		return out
	}
	out.Tiers = maps.Clone(t.Tiers)
	for k := range out.Tiers {
		if v, ok := taus[k]; ok {
			out.Tiers[k] = v
		}
	}
	out.ExitThreshold = out.Tiers[out.DefaultTier]
	return out
}
