package tokenizer

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// ErrUnsupportedTemplate marks a chat template this package cannot render faithfully.
// Hugging Face chat templates are Jinja programs; this package renders the subset that
// ChatML templates are written in — text, comments, whitespace control, one
// "for m in messages" loop, "if [not] add_generation_prompt ... else ... endif", and
// expressions joining string literals, m.role, m.content, bos_token and eos_token with +
// or ~ — and refuses anything else rather than render it differently from transformers.
var ErrUnsupportedTemplate = errors.New("unsupported chat template")

// ErrNoTemplate means the tokenizer has no chat template (LoadDir found none).
var ErrNoTemplate = errors.New("no chat template")

// Message is one chat turn. Role is usually "system", "user" or "assistant".
type Message struct {
	Role, Content string
}

// ApplyChat renders msgs with the chat template of tokenizer_config.json, as
// transformers' apply_chat_template(msgs, tokenize=False, add_generation_prompt=...) does.
// With addGenerationPrompt the text ends with the opening of an assistant turn. Encode
// the result to get prompt ids (its special tokens become their ids).
func (t *Tokenizer) ApplyChat(msgs []Message, addGenerationPrompt bool) (string, error) {
	if t.chatErr != nil {
		return "", t.chatErr
	}
	if t.chat == nil {
		return "", ErrNoTemplate
	}
	var b strings.Builder
	t.chat.render(&b, t.chat.nodes, msgs, nil, addGenerationPrompt)
	return b.String(), nil
}

// chatTemplate is a parsed template of the supported subset:
//
//	text, {# comments #}, whitespace control ({%- -%} {{- -}} {%+ +%}),
//	{% for VAR in messages %} ... {% endfor %},
//	{% if [not] add_generation_prompt %} ... [{% else %} ...] {% endif %},
//	{{ EXPR }} where EXPR joins with + or ~ string literals, VAR.role, VAR.content,
//	VAR['role'], VAR["content"], bos_token and eos_token.
//
// It lexes with the options transformers sets (trim_blocks, lstrip_blocks, no
// keep_trailing_newline), so such templates render byte for byte as in Python.
type chatTemplate struct {
	nodes    []tnode
	bos, eos string
}

// tnode is one node of a parsed template: exactly one field is set.
type tnode struct {
	text  string
	expr  []term
	loop  []tnode // body of the for loop over messages
	cond  *ifNode
	isTxt bool
}

type ifNode struct {
	negate     bool
	then, els_ []tnode
}

type termKind int

const (
	termLit termKind = iota
	termRole
	termContent
	termBOS
	termEOS
)

type term struct {
	kind termKind
	lit  string
}

func (c *chatTemplate) render(b *strings.Builder, nodes []tnode, msgs []Message, m *Message, gen bool) {
	for _, n := range nodes {
		switch {
		case n.isTxt:
			b.WriteString(n.text)
		case n.expr != nil:
			for _, tm := range n.expr {
				switch tm.kind {
				case termLit:
					b.WriteString(tm.lit)
				case termRole:
					b.WriteString(m.Role)
				case termContent:
					b.WriteString(m.Content)
				case termBOS:
					b.WriteString(c.bos)
				case termEOS:
					b.WriteString(c.eos)
				}
			}
		case n.loop != nil:
			for i := range msgs {
				c.render(b, n.loop, msgs, &msgs[i], gen)
			}
		case n.cond != nil:
			if gen != n.cond.negate {
				c.render(b, n.cond.then, msgs, m, gen)
			} else {
				c.render(b, n.cond.els_, msgs, m, gen)
			}
		}
	}
}

// tag is one lexed {{ }}, {% %} or {# #} tag, or a run of text (kind 0).
type tag struct {
	kind byte // 0 text, '{' expression, '%' statement, '#' comment
	body string
}

// lexTemplate splits src into text and tags, applying Jinja's whitespace rules as
// transformers configures them: trim_blocks, lstrip_blocks, and dropping one trailing
// newline.
func lexTemplate(src string) ([]tag, error) {
	src = strings.ReplaceAll(src, "\r\n", "\n")
	src = strings.ReplaceAll(src, "\r", "\n")
	src = strings.TrimSuffix(src, "\n")
	var out []tag
	pos := 0
	lineStarting := true
	for pos < len(src) {
		start := nextTagStart(src, pos)
		if start < 0 {
			out = append(out, tag{body: src[pos:]})
			break
		}
		kind := src[start+1]
		text := src[pos:start]
		open := start + 2
		sign := byte(0)
		if open < len(src) && (src[open] == '-' || src[open] == '+') {
			sign = src[open]
			open++
		}
		switch {
		case sign == '-':
			text = strings.TrimRightFunc(text, pySpace)
		case sign != '+' && kind != '{':
			// lstrip_blocks: a block or comment alone on its line takes the line's
			// indentation with it.
			lpos := strings.LastIndexByte(text, '\n') + 1
			if rest := text[lpos:]; (lpos > 0 || lineStarting) && rest != "" && strings.TrimFunc(rest, pySpace) == "" {
				text = text[:lpos]
			}
		}
		if text != "" {
			out = append(out, tag{body: text})
		}
		bodyEnd, end, err := tagEnd(src, open, kind)
		if err != nil {
			return nil, err
		}
		out = append(out, tag{kind: kind, body: src[open:bodyEnd]})
		closeSign := byte(0)
		if bodyEnd < len(src) && bodyEnd < end-2 {
			closeSign = src[bodyEnd]
		}
		pos = end
		switch {
		case closeSign == '-':
			rest := strings.TrimLeftFunc(src[pos:], pySpace)
			pos = len(src) - len(rest)
		case closeSign == '+' || kind == '{':
		case pos < len(src) && src[pos] == '\n': // trim_blocks
			pos++
		}
		lineStarting = pos > 0 && src[pos-1] == '\n'
	}
	return out, nil
}

// pySpace is Python's str.isspace, which Jinja's stripping follows: Unicode whitespace
// plus the separators U+001C..U+001F.
func pySpace(r rune) bool {
	return unicode.IsSpace(r) || r >= 0x1C && r <= 0x1F
}

func nextTagStart(src string, from int) int {
	for i := from; i+1 < len(src); i++ {
		if src[i] == '{' && (src[i+1] == '{' || src[i+1] == '%' || src[i+1] == '#') {
			return i
		}
	}
	return -1
}

// tagEnd finds the close of a tag whose body starts at i: bodyEnd is where the body
// stops (before a - or + sign) and end is just past the closing delimiter. Quoted
// strings inside expressions and statements may hold the delimiter.
func tagEnd(src string, i int, kind byte) (bodyEnd, end int, err error) {
	closer := "}}"
	switch kind {
	case '%':
		closer = "%}"
	case '#':
		closer = "#}"
	}
	var quote byte
	for j := i; j < len(src); j++ {
		c := src[j]
		if quote != 0 {
			if c == '\\' {
				j++
			} else if c == quote {
				quote = 0
			}
			continue
		}
		if kind != '#' && (c == '\'' || c == '"') {
			quote = c
			continue
		}
		if strings.HasPrefix(src[j:], closer) {
			bodyEnd = j
			if j > i && (src[j-1] == '-' || (src[j-1] == '+' && kind != '{')) {
				bodyEnd = j - 1
			}
			return bodyEnd, j + 2, nil
		}
	}
	return 0, 0, fmt.Errorf("%w: unclosed %q tag", ErrUnsupportedTemplate, "{"+string(kind))
}

// parseChatTemplate parses src into the supported subset or returns an error wrapping
// ErrUnsupportedTemplate that names the first construct outside it.
func parseChatTemplate(src, bos, eos string) (*chatTemplate, error) {
	tags, err := lexTemplate(src)
	if err != nil {
		return nil, err
	}
	p := &tmplParser{tags: tags}
	nodes, stop, err := p.parse("")
	if err != nil {
		return nil, err
	}
	if stop != "" {
		return nil, fmt.Errorf("%w: unexpected {%% %s %%}", ErrUnsupportedTemplate, stop)
	}
	return &chatTemplate{nodes: nodes, bos: bos, eos: eos}, nil
}

type tmplParser struct {
	tags    []tag
	i       int
	loopVar string // name bound by the enclosing for loop, "" outside one
}

// parse reads nodes until a statement in stops ("endfor", "endif else") or the end; it
// returns the statement that stopped it.
func (p *tmplParser) parse(stops string) ([]tnode, string, error) {
	var nodes []tnode
	for p.i < len(p.tags) {
		tg := p.tags[p.i]
		p.i++
		switch tg.kind {
		case 0:
			nodes = append(nodes, tnode{text: tg.body, isTxt: true})
		case '#':
		case '{':
			terms, err := p.parseExpr(tg.body)
			if err != nil {
				return nil, "", err
			}
			if terms == nil {
				terms = []term{} // an empty string still marks the node as an expression
			}
			nodes = append(nodes, tnode{expr: terms})
		case '%':
			words := strings.Fields(tg.body)
			if len(words) == 0 {
				return nil, "", fmt.Errorf("%w: empty statement", ErrUnsupportedTemplate)
			}
			switch {
			case len(words) == 1 && strings.Contains(" "+stops+" ", " "+words[0]+" "):
				return nodes, words[0], nil
			case len(words) == 4 && words[0] == "for" && words[2] == "in" && words[3] == "messages" && p.loopVar == "" && isIdent(words[1]):
				p.loopVar = words[1]
				body, stop, err := p.parse("endfor")
				p.loopVar = ""
				if err != nil {
					return nil, "", err
				}
				if stop != "endfor" {
					return nil, "", fmt.Errorf("%w: for without endfor", ErrUnsupportedTemplate)
				}
				if body == nil {
					body = []tnode{}
				}
				nodes = append(nodes, tnode{loop: body})
			case words[0] == "if" && (len(words) == 2 && words[1] == "add_generation_prompt" ||
				len(words) == 3 && words[1] == "not" && words[2] == "add_generation_prompt"):
				n := &ifNode{negate: len(words) == 3}
				var stop string
				var err error
				if n.then, stop, err = p.parse("endif else"); err != nil {
					return nil, "", err
				}
				if stop == "else" {
					if n.els_, stop, err = p.parse("endif"); err != nil {
						return nil, "", err
					}
				}
				if stop != "endif" {
					return nil, "", fmt.Errorf("%w: if without endif", ErrUnsupportedTemplate)
				}
				nodes = append(nodes, tnode{cond: n})
			default:
				return nil, "", fmt.Errorf("%w: statement {%% %s %%}", ErrUnsupportedTemplate, strings.TrimSpace(tg.body))
			}
		}
	}
	return nodes, "", nil
}

// parseExpr parses a concatenation of string literals and variables.
func (p *tmplParser) parseExpr(src string) ([]term, error) {
	unsupported := func() ([]term, error) {
		return nil, fmt.Errorf("%w: expression {{ %s }}", ErrUnsupportedTemplate, strings.TrimSpace(src))
	}
	var terms []term
	s := strings.TrimSpace(src)
	for {
		if s == "" {
			return unsupported()
		}
		var tm term
		var ok bool
		tm, s, ok = p.parseTerm(s)
		if !ok {
			return unsupported()
		}
		if tm.kind != termLit || tm.lit != "" {
			terms = append(terms, tm)
		}
		s = strings.TrimSpace(s)
		if s == "" {
			return terms, nil
		}
		if s[0] != '+' && s[0] != '~' {
			return unsupported()
		}
		s = strings.TrimSpace(s[1:])
	}
}

func (p *tmplParser) parseTerm(s string) (term, string, bool) {
	if s[0] == '\'' || s[0] == '"' {
		lit, rest, ok := parseStringLit(s)
		return term{kind: termLit, lit: lit}, rest, ok
	}
	n := 0
	for n < len(s) && (s[n] == '_' || s[n] >= 'a' && s[n] <= 'z' || s[n] >= 'A' && s[n] <= 'Z' || n > 0 && s[n] >= '0' && s[n] <= '9') {
		n++
	}
	name, rest := s[:n], s[n:]
	switch {
	case name == "bos_token":
		return term{kind: termBOS}, rest, true
	case name == "eos_token":
		return term{kind: termEOS}, rest, true
	case name == "" || name != p.loopVar:
		return term{}, s, false
	}
	rest = strings.TrimLeft(rest, " \t\n")
	var field string
	switch {
	case strings.HasPrefix(rest, "."):
		rest = strings.TrimLeft(rest[1:], " \t\n")
		m := 0
		for m < len(rest) && (rest[m] == '_' || rest[m] >= 'a' && rest[m] <= 'z' || rest[m] >= 'A' && rest[m] <= 'Z') {
			m++
		}
		field, rest = rest[:m], rest[m:]
	case strings.HasPrefix(rest, "["):
		rest = strings.TrimLeft(rest[1:], " \t\n")
		if rest == "" || (rest[0] != '\'' && rest[0] != '"') {
			return term{}, s, false
		}
		var ok bool
		if field, rest, ok = parseStringLit(rest); !ok {
			return term{}, s, false
		}
		rest = strings.TrimLeft(rest, " \t\n")
		if !strings.HasPrefix(rest, "]") {
			return term{}, s, false
		}
		rest = rest[1:]
	}
	switch field {
	case "role":
		return term{kind: termRole}, rest, true
	case "content":
		return term{kind: termContent}, rest, true
	}
	return term{}, s, false
}

func isIdent(s string) bool {
	for i, r := range s {
		if !(r == '_' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || i > 0 && r >= '0' && r <= '9') {
			return false
		}
	}
	return s != ""
}

// parseStringLit reads a quoted Jinja string literal at the start of s, decoding the
// escapes Python's unicode-escape codec knows (an unknown escape keeps its backslash).
func parseStringLit(s string) (lit, rest string, ok bool) {
	q := s[0]
	var b strings.Builder
	for i := 1; i < len(s); i++ {
		c := s[i]
		if c == q {
			return b.String(), s[i+1:], true
		}
		if c != '\\' {
			b.WriteByte(c)
			continue
		}
		i++
		if i >= len(s) {
			return "", s, false
		}
		switch e := s[i]; e {
		case 'n':
			b.WriteByte('\n')
		case 't':
			b.WriteByte('\t')
		case 'r':
			b.WriteByte('\r')
		case 'a':
			b.WriteByte('\a')
		case 'b':
			b.WriteByte('\b')
		case 'f':
			b.WriteByte('\f')
		case 'v':
			b.WriteByte('\v')
		case '\\', '\'', '"':
			b.WriteByte(e)
		case '\n':
			// a backslash-newline continues the line
		case 'x', 'u', 'U':
			n := map[byte]int{'x': 2, 'u': 4, 'U': 8}[e]
			if i+n >= len(s) {
				return "", s, false
			}
			v, err := strconv.ParseUint(s[i+1:i+1+n], 16, 32)
			if err != nil || !utf8.ValidRune(rune(v)) {
				return "", s, false
			}
			b.WriteRune(rune(v))
			i += n
		default:
			if e >= '0' && e <= '7' || e == 'N' {
				return "", s, false // octal and named escapes: not worth supporting
			}
			b.WriteByte('\\')
			b.WriteByte(e)
		}
	}
	return "", s, false
}
