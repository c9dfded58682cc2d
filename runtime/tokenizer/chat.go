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
// "for m in messages" loop, if/elif/else/endif, and expressions joining string literals,
// m.role, m.content, messages[N].role, messages[N].content, bos_token and eos_token with +
// or ~ — and refuses anything else rather than render it differently from transformers.
// Tests are add_generation_prompt, loop.first, loop.last and == or != between such values,
// joined by not, and, or and parentheses.
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
	t.chat.render(&b, t.chat.nodes, renderCtx{msgs: msgs, i: -1, gen: addGenerationPrompt})
	return b.String(), nil
}

// chatTemplate is a parsed template of the supported subset:
//
//	text, {# comments #}, whitespace control ({%- -%} {{- -}} {%+ +%}),
//	{% for VAR in messages %} ... {% endfor %},
//	{% if TEST %} ... [{% elif TEST %} ...] [{% else %} ...] {% endif %},
//	{{ EXPR }} where EXPR joins with + or ~ values: string literals, VAR.role, VAR.content,
//	VAR['role'], VAR["content"], messages[N].role (N an integer, negative from the end),
//	messages[N]['content'], bos_token and eos_token;
//	TEST: add_generation_prompt, loop.first, loop.last, VALUE == VALUE, VALUE != VALUE,
//	joined by not, and, or and parentheses.
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
	test       *cond
	then, els_ []tnode // an elif is an else holding one if
}

type condKind int

const (
	condGen   condKind = iota // add_generation_prompt
	condFirst                 // loop.first
	condLast                  // loop.last
	condNot                   // not a
	condAnd                   // a and b
	condOr                    // a or b
	condEq                    // l == r (r != l with neq)
)

// cond is a parsed if/elif test.
type cond struct {
	kind condKind
	a, b *cond
	l, r term
	neq  bool
}

// renderCtx is where a template is being rendered: the messages, the loop's current message
// and index (nil and -1 outside the loop) and add_generation_prompt.
type renderCtx struct {
	msgs []Message
	m    *Message
	i    int
	gen  bool
}

func (c *cond) eval(t *chatTemplate, x renderCtx) bool {
	switch c.kind {
	case condGen:
		return x.gen
	case condFirst:
		return x.i == 0
	case condLast:
		return x.i == len(x.msgs)-1
	case condNot:
		return !c.a.eval(t, x)
	case condAnd:
		return c.a.eval(t, x) && c.b.eval(t, x)
	case condOr:
		return c.a.eval(t, x) || c.b.eval(t, x)
	}
	return (t.value(c.l, x) == t.value(c.r, x)) != c.neq
}

type termKind int

const (
	termLit termKind = iota
	termRole
	termContent
	termBOS
	termEOS
	termMsgRole    // messages[idx].role
	termMsgContent // messages[idx].content
)

type term struct {
	kind termKind
	lit  string
	idx  int // termMsg*: the index, negative from the end as in Python
}

// value is a term's text where it is rendered.
func (c *chatTemplate) value(tm term, x renderCtx) string {
	switch tm.kind {
	case termLit:
		return tm.lit
	case termRole:
		return x.m.Role
	case termContent:
		return x.m.Content
	case termBOS:
		return c.bos
	case termEOS:
		return c.eos
	}
	i := tm.idx
	if i < 0 {
		i += len(x.msgs)
	}
	if i < 0 || i >= len(x.msgs) {
		return "" // Jinja would fail on a missing message; callers always pass some
	}
	if tm.kind == termMsgRole {
		return x.msgs[i].Role
	}
	return x.msgs[i].Content
}

func (c *chatTemplate) render(b *strings.Builder, nodes []tnode, x renderCtx) {
	for _, n := range nodes {
		switch {
		case n.isTxt:
			b.WriteString(n.text)
		case n.expr != nil:
			for _, tm := range n.expr {
				b.WriteString(c.value(tm, x))
			}
		case n.loop != nil:
			for i := range x.msgs {
				c.render(b, n.loop, renderCtx{msgs: x.msgs, m: &x.msgs[i], i: i, gen: x.gen})
			}
		case n.cond != nil:
			if n.cond.test.eval(c, x) {
				c.render(b, n.cond.then, x)
			} else {
				c.render(b, n.cond.els_, x)
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
	elif    string // the body of the elif tag that stopped parse
}

// parseIf parses an if (or elif) statement whose tag body is body, up to its endif.
func (p *tmplParser) parseIf(body string) (*ifNode, error) {
	kw, src, _ := strings.Cut(strings.TrimSpace(body), " ")
	test, err := p.parseCond(src)
	if err != nil {
		return nil, err
	}
	n := &ifNode{test: test}
	var stop string
	if n.then, stop, err = p.parse("endif else elif"); err != nil {
		return nil, err
	}
	switch stop {
	case "elif":
		inner, err := p.parseIf(p.elif) // consumes the shared endif
		if err != nil {
			return nil, err
		}
		n.els_ = []tnode{{cond: inner}}
		return n, nil
	case "else":
		if n.els_, stop, err = p.parse("endif"); err != nil {
			return nil, err
		}
	}
	if stop != "endif" {
		return nil, fmt.Errorf("%w: %s without endif", ErrUnsupportedTemplate, kw)
	}
	return n, nil
}

// parseCond parses an if test: add_generation_prompt, loop.first, loop.last and comparisons
// (== !=) of values parseTerm knows, joined by not, and, or and parentheses.
func (p *tmplParser) parseCond(src string) (*cond, error) {
	c, rest, ok := p.condOr(strings.TrimSpace(src))
	if !ok || strings.TrimSpace(rest) != "" {
		return nil, fmt.Errorf("%w: test %q", ErrUnsupportedTemplate, strings.TrimSpace(src))
	}
	return c, nil
}

// keyword reports whether s starts with the word kw, returning what follows it.
func keyword(s, kw string) (string, bool) {
	rest, ok := strings.CutPrefix(s, kw)
	if !ok || rest != "" && (rest[0] == '_' || rest[0] == '.' || isIdent(rest[:1]) || rest[0] >= '0' && rest[0] <= '9') {
		return s, false
	}
	return strings.TrimLeft(rest, " \t\n"), true
}

func (p *tmplParser) condOr(s string) (*cond, string, bool) {
	a, s, ok := p.condAnd(s)
	for ok {
		rest, more := keyword(s, "or")
		if !more {
			break
		}
		var b *cond
		if b, s, ok = p.condAnd(rest); ok {
			a = &cond{kind: condOr, a: a, b: b}
		}
	}
	return a, s, ok
}

func (p *tmplParser) condAnd(s string) (*cond, string, bool) {
	a, s, ok := p.condNot(s)
	for ok {
		rest, more := keyword(s, "and")
		if !more {
			break
		}
		var b *cond
		if b, s, ok = p.condNot(rest); ok {
			a = &cond{kind: condAnd, a: a, b: b}
		}
	}
	return a, s, ok
}

func (p *tmplParser) condNot(s string) (*cond, string, bool) {
	if rest, ok := keyword(s, "not"); ok {
		a, rest, ok := p.condNot(rest)
		return &cond{kind: condNot, a: a}, rest, ok
	}
	return p.condAtom(s)
}

func (p *tmplParser) condAtom(s string) (*cond, string, bool) {
	trim := func(s string) string { return strings.TrimLeft(s, " \t\n") }
	if rest, ok := strings.CutPrefix(s, "("); ok {
		c, rest, ok := p.condOr(trim(rest))
		if rest, closed := strings.CutPrefix(rest, ")"); ok && closed {
			return c, trim(rest), true
		}
		return nil, s, false
	}
	if rest, ok := keyword(s, "add_generation_prompt"); ok {
		return &cond{kind: condGen}, rest, true
	}
	if p.loopVar != "" {
		if rest, ok := keyword(s, "loop.first"); ok {
			return &cond{kind: condFirst}, rest, true
		}
		if rest, ok := keyword(s, "loop.last"); ok {
			return &cond{kind: condLast}, rest, true
		}
	}
	if s == "" {
		return nil, s, false
	}
	l, rest, ok := p.parseTerm(s)
	if !ok {
		return nil, s, false
	}
	rest = trim(rest)
	var neq bool
	switch {
	case strings.HasPrefix(rest, "=="):
	case strings.HasPrefix(rest, "!="):
		neq = true
	default:
		return nil, s, false
	}
	rest = trim(rest[2:])
	if rest == "" {
		return nil, s, false
	}
	r, rest, ok := p.parseTerm(rest)
	if !ok {
		return nil, s, false
	}
	return &cond{kind: condEq, l: l, r: r, neq: neq}, trim(rest), true
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
			case words[0] == "if":
				n, err := p.parseIf(tg.body)
				if err != nil {
					return nil, "", err
				}
				nodes = append(nodes, tnode{cond: n})
			case words[0] == "elif" && strings.Contains(" "+stops+" ", " elif "):
				p.elif = tg.body
				return nodes, "elif", nil
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
	case name == "messages" && name != p.loopVar:
		// messages[N] with an integer literal N, then a field as for the loop variable.
		r, ok := strings.CutPrefix(strings.TrimLeft(rest, " \t\n"), "[")
		if !ok {
			return term{}, s, false
		}
		num, after, ok := strings.Cut(r, "]")
		idx, err := strconv.Atoi(strings.TrimSpace(num))
		if !ok || err != nil {
			return term{}, s, false
		}
		field, rest, ok := parseField(after)
		switch {
		case ok && field == "role":
			return term{kind: termMsgRole, idx: idx}, rest, true
		case ok && field == "content":
			return term{kind: termMsgContent, idx: idx}, rest, true
		}
		return term{}, s, false
	case name == "" || name != p.loopVar:
		return term{}, s, false
	}
	field, rest, ok := parseField(rest)
	switch {
	case ok && field == "role":
		return term{kind: termRole}, rest, true
	case ok && field == "content":
		return term{kind: termContent}, rest, true
	}
	return term{}, s, false
}

// parseField reads a field access, .name or ['name'], at the start of s.
func parseField(s string) (field, rest string, ok bool) {
	rest = strings.TrimLeft(s, " \t\n")
	switch {
	case strings.HasPrefix(rest, "."):
		rest = strings.TrimLeft(rest[1:], " \t\n")
		m := 0
		for m < len(rest) && (rest[m] == '_' || rest[m] >= 'a' && rest[m] <= 'z' || rest[m] >= 'A' && rest[m] <= 'Z') {
			m++
		}
		return rest[:m], rest[m:], m > 0
	case strings.HasPrefix(rest, "["):
		rest = strings.TrimLeft(rest[1:], " \t\n")
		if rest == "" || (rest[0] != '\'' && rest[0] != '"') {
			return "", s, false
		}
		if field, rest, ok = parseStringLit(rest); !ok {
			return "", s, false
		}
		rest, ok = strings.CutPrefix(strings.TrimLeft(rest, " \t\n"), "]")
		return field, rest, ok
	}
	return "", s, false
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
