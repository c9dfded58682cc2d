package cpu

// spinPause is one PAUSE: a spin-wait hint that yields the core's pipeline to its sibling.
func spinPause()
