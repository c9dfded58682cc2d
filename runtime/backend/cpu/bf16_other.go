//go:build !amd64

package cpu

var haveBF16 = false

var dpTiles [6]func(w *uint16, ldw int, x *uint16, ldx int, k int, out *float32, ldo int)

var pairTiles [5]func(w *uint16, ldw int, x *float32, ldx int, k int, out *float32, ldo int)
