package main

// This file draws the benchmark's chart with the standard library only (no
// plotting library, no font files): two bar panels, peak throughput and
// p99 latency, with min-max whiskers over the rounds, labelled with a
// built-in 5x7 pixel font.

import (
	"fmt"
	"image"
	"image/color"
	"image/png"
	"os"
	"strings"
	"time"
)

var (
	colWhite = color.RGBA{255, 255, 255, 255}
	colInk   = color.RGBA{30, 30, 30, 255}
	colGrid  = color.RGBA{225, 225, 225, 255}
	colBars  = []color.RGBA{
		{120, 120, 120, 255}, // backend
		{66, 133, 244, 255},  // caddy
		{52, 168, 83, 255},   // apikeys
		{234, 67, 53, 255},   // apikeys, cache off
	}
)

const (
	chartW, chartH = 1000, 460
	scale          = 2 // font pixel size
)

func writeChart(path string, r *report) error {
	img := image.NewRGBA(image.Rect(0, 0, chartW, chartH))
	fill(img, img.Bounds(), colWhite)
	drawText(img, 20, 14, "CADDY-APIKEYS LOAD BENCHMARK: MEDIANS OF "+fmt.Sprint(r.Rounds)+" ROUNDS, MIN-MAX WHISKERS", colInk)

	var names []string
	var rps, rpsLo, rpsHi, p99, p99Lo, p99Hi []float64
	for _, s := range r.Configs {
		names = append(names, s.Label)
		rps, rpsLo, rpsHi = append(rps, s.RPS), append(rpsLo, s.RPSMin), append(rpsHi, s.RPSMax)
		p99, p99Lo, p99Hi = append(p99, ms(s.P99)), append(p99Lo, ms(s.P99Min)), append(p99Hi, ms(s.P99Max))
	}
	panel(img, image.Rect(20, 50, 490, 440), "PEAK THROUGHPUT (REQ/S)", names, rps, rpsLo, rpsHi)
	panel(img, image.Rect(510, 50, 980, 440), fmt.Sprintf("P99 LATENCY AT %.0f REQ/S (MS)", r.Rate), names, p99, p99Lo, p99Hi)

	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := png.Encode(f, img); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// panel draws a titled bar chart of vals (with lo-hi whiskers) in area.
func panel(img *image.RGBA, area image.Rectangle, title string, names []string, vals, lo, hi []float64) {
	drawText(img, area.Min.X, area.Min.Y, title, colInk)
	plot := image.Rect(area.Min.X+70, area.Min.Y+40, area.Max.X-10, area.Max.Y-40)
	top := 0.0
	for _, v := range hi {
		top = max(top, v)
	}
	top = niceCeil(top * 1.1)
	// Grid lines at quarters, labelled.
	for i := 0; i <= 4; i++ {
		y := plot.Max.Y - i*plot.Dy()/4
		fill(img, image.Rect(plot.Min.X, y, plot.Max.X, y+1), colGrid)
		label := short(top * float64(i) / 4)
		drawText(img, plot.Min.X-8-textWidth(label), y-7, label, colInk)
	}
	fill(img, image.Rect(plot.Min.X, plot.Max.Y, plot.Max.X, plot.Max.Y+2), colInk)
	n := len(vals)
	slot := plot.Dx() / n
	for i, v := range vals {
		x0 := plot.Min.X + i*slot + slot/5
		x1 := plot.Min.X + (i+1)*slot - slot/5
		y := plot.Max.Y - int(v/top*float64(plot.Dy()))
		fill(img, image.Rect(x0, y, x1, plot.Max.Y), colBars[i%len(colBars)])
		// whisker
		cx := (x0 + x1) / 2
		yLo := plot.Max.Y - int(lo[i]/top*float64(plot.Dy()))
		yHi := plot.Max.Y - int(hi[i]/top*float64(plot.Dy()))
		fill(img, image.Rect(cx-1, yHi, cx+1, yLo+1), colInk)
		fill(img, image.Rect(cx-6, yHi, cx+6, yHi+2), colInk)
		fill(img, image.Rect(cx-6, yLo-1, cx+6, yLo+1), colInk)
		label := short(v)
		drawText(img, cx-textWidth(label)/2, yHi-20, label, colInk)
		drawText(img, cx-textWidth(names[i])/2, plot.Max.Y+10, names[i], colInk)
	}
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := 1.0
	for p*10 <= v {
		p *= 10
	}
	for p > v {
		p /= 10
	}
	for _, m := range []float64{1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10} {
		if p*m >= v {
			return p * m
		}
	}
	return p * 10
}

// short formats a value compactly: 12345 -> 12.3K.
func short(v float64) string {
	switch {
	case v >= 10000:
		return fmt.Sprintf("%.1fK", v/1000)
	case v >= 100:
		return fmt.Sprintf("%.0f", v)
	default:
		return fmt.Sprintf("%.1f", v)
	}
}

func fill(img *image.RGBA, r image.Rectangle, c color.RGBA) {
	r = r.Intersect(img.Bounds())
	for y := r.Min.Y; y < r.Max.Y; y++ {
		for x := r.Min.X; x < r.Max.X; x++ {
			img.SetRGBA(x, y, c)
		}
	}
}

func textWidth(s string) int { return len(s) * 6 * scale }

// drawText writes s (upper-cased) with its top-left corner at x, y.
func drawText(img *image.RGBA, x, y int, s string, c color.RGBA) {
	for _, ch := range strings.ToUpper(s) {
		g, ok := glyphs[ch]
		if !ok {
			g = glyphs['?']
		}
		for row, bits := range g {
			for col, b := range bits {
				if b == '#' {
					fill(img, image.Rect(x+col*scale, y+row*scale, x+(col+1)*scale, y+(row+1)*scale), c)
				}
			}
		}
		x += 6 * scale
	}
}

// glyphs is a 5x7 pixel font for the characters the chart uses.
var glyphs = map[rune][7]string{
	' ': {".....", ".....", ".....", ".....", ".....", ".....", "....."},
	'?': {".###.", "#...#", "....#", "...#.", "..#..", ".....", "..#.."},
	'.': {".....", ".....", ".....", ".....", ".....", ".##..", ".##.."},
	',': {".....", ".....", ".....", ".....", ".##..", "..#..", ".#..."},
	':': {".....", ".##..", ".##..", ".....", ".##..", ".##..", "....."},
	'-': {".....", ".....", ".....", "#####", ".....", ".....", "....."},
	'+': {".....", "..#..", "..#..", "#####", "..#..", "..#..", "....."},
	'/': {"....#", "...#.", "...#.", "..#..", ".#...", ".#...", "#...."},
	'%': {"##..#", "##..#", "...#.", "..#..", ".#...", "#..##", "#..##"},
	'(': {"...#.", "..#..", ".#...", ".#...", ".#...", "..#..", "...#."},
	')': {".#...", "..#..", "...#.", "...#.", "...#.", "..#..", ".#..."},
	'0': {".###.", "#...#", "#..##", "#.#.#", "##..#", "#...#", ".###."},
	'1': {"..#..", ".##..", "..#..", "..#..", "..#..", "..#..", ".###."},
	'2': {".###.", "#...#", "....#", "...#.", "..#..", ".#...", "#####"},
	'3': {"#####", "...#.", "..#..", "...#.", "....#", "#...#", ".###."},
	'4': {"...#.", "..##.", ".#.#.", "#..#.", "#####", "...#.", "...#."},
	'5': {"#####", "#....", "####.", "....#", "....#", "#...#", ".###."},
	'6': {"..##.", ".#...", "#....", "####.", "#...#", "#...#", ".###."},
	'7': {"#####", "....#", "...#.", "..#..", ".#...", ".#...", ".#..."},
	'8': {".###.", "#...#", "#...#", ".###.", "#...#", "#...#", ".###."},
	'9': {".###.", "#...#", "#...#", ".####", "....#", "...#.", ".##.."},
	'A': {".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"},
	'B': {"####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."},
	'C': {".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."},
	'D': {"###..", "#..#.", "#...#", "#...#", "#...#", "#..#.", "###.."},
	'E': {"#####", "#....", "#....", "####.", "#....", "#....", "#####"},
	'F': {"#####", "#....", "#....", "####.", "#....", "#....", "#...."},
	'G': {".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"},
	'H': {"#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"},
	'I': {".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."},
	'J': {"..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."},
	'K': {"#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"},
	'L': {"#....", "#....", "#....", "#....", "#....", "#....", "#####"},
	'M': {"#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"},
	'N': {"#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"},
	'O': {".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."},
	'P': {"####.", "#...#", "#...#", "####.", "#....", "#....", "#...."},
	'Q': {".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"},
	'R': {"####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"},
	'S': {".####", "#....", "#....", ".###.", "....#", "....#", "####."},
	'T': {"#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."},
	'U': {"#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."},
	'V': {"#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."},
	'W': {"#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."},
	'X': {"#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"},
	'Y': {"#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."},
	'Z': {"#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"},
}
