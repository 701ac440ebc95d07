package domxml

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Kind says what a Node is.
type Kind int

// Node kinds.
const (
	Element Kind = iota
	Text         // character data, CDATA included
	Comment
	ProcInst
	Directive
)

// Node is one node of an XML document kept for rewriting. Parsing records
// each node's exact source bytes (Raw); serialising an unmodified node
// writes those bytes back, so a rewrite changes only what it touched and a
// diff shows only real changes (libvirt writes attributes with single
// quotes, a hand-written file may use double ones; both survive).
type Node struct {
	Kind Kind
	// Name is the element's qualified name as written, "prefix:local" or
	// "local"; namespaces are not resolved, which keeps prefixes intact.
	Name     string
	Attrs    []xml.Attr // Name.Space holds the prefix ("xmlns" for declarations)
	Children []*Node
	// Text is the decoded content of a Text or Comment node, the target
	// and instruction of a ProcInst ("target inst"), or a Directive's body.
	Text string

	raw       string // start tag (elements) or whole node as parsed
	endRaw    string // end tag as parsed ("</name >" keeps its spaces)
	selfClose bool
	dirty     bool // start tag must be re-serialised
}

// Document is a parsed XML document: the root element and whatever
// surrounds it (XML declaration, comments, whitespace).
type Document struct {
	Nodes []*Node // top level, in order; exactly one is an Element
}

// Parse reads a whole XML document. Bad XML is an error wrapping
// ErrBadXML that names the offset of the problem.
func Parse(data []byte) (*Document, error) {
	d := xml.NewDecoder(bytes.NewReader(data))
	d.Strict = true
	doc := &Document{}
	var stack []*Node
	add := func(n *Node) {
		if len(stack) == 0 {
			doc.Nodes = append(doc.Nodes, n)
			return
		}
		p := stack[len(stack)-1]
		p.Children = append(p.Children, n)
	}
	roots := 0
	for {
		start := d.InputOffset()
		tok, err := d.RawToken()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrBadXML, err)
		}
		raw := string(data[start:d.InputOffset()])
		switch t := tok.(type) {
		case xml.StartElement:
			n := &Node{Kind: Element, Name: qname(t.Name), Attrs: append([]xml.Attr(nil), t.Attr...), raw: raw}
			// encoding/xml accepts a repeated attribute and its readers
			// take the last one; refuse it, or a rewrite could change one
			// copy while the typed view reads the other.
			seen := map[string]bool{}
			for _, a := range t.Attr {
				q := qname(a.Name)
				if seen[q] {
					return nil, fmt.Errorf("%w: attribute %s repeated on <%s> at offset %d", ErrBadXML, q, n.Name, start)
				}
				seen[q] = true
			}
			n.selfClose = strings.HasSuffix(raw, "/>")
			if len(stack) == 0 {
				roots++
				if roots > 1 {
					return nil, fmt.Errorf("%w: second root element <%s> at offset %d", ErrBadXML, n.Name, start)
				}
			}
			add(n)
			stack = append(stack, n)
		case xml.EndElement:
			if len(stack) == 0 {
				return nil, fmt.Errorf("%w: unexpected </%s> at offset %d", ErrBadXML, qname(t.Name), start)
			}
			top := stack[len(stack)-1]
			if top.Name != qname(t.Name) {
				return nil, fmt.Errorf("%w: </%s> at offset %d closes <%s>", ErrBadXML, qname(t.Name), start, top.Name)
			}
			if !top.selfClose {
				top.endRaw = raw
			}
			stack = stack[:len(stack)-1]
		case xml.CharData:
			if len(stack) == 0 && len(bytes.TrimSpace(t)) > 0 {
				return nil, fmt.Errorf("%w: text outside the root element at offset %d", ErrBadXML, start)
			}
			add(&Node{Kind: Text, Text: string(t), raw: raw})
		case xml.Comment:
			add(&Node{Kind: Comment, Text: string(t), raw: raw})
		case xml.ProcInst:
			add(&Node{Kind: ProcInst, Text: t.Target + " " + string(t.Inst), raw: raw})
		case xml.Directive:
			add(&Node{Kind: Directive, Text: string(t), raw: raw})
		}
	}
	if len(stack) > 0 {
		return nil, fmt.Errorf("%w: <%s> is never closed", ErrBadXML, stack[len(stack)-1].Name)
	}
	if roots == 0 {
		return nil, fmt.Errorf("%w: no root element", ErrBadXML)
	}
	return doc, nil
}

func qname(n xml.Name) string {
	if n.Space == "" {
		return n.Local
	}
	return n.Space + ":" + n.Local
}

// Root returns the document's root element.
func (d *Document) Root() *Node {
	for _, n := range d.Nodes {
		if n.Kind == Element {
			return n
		}
	}
	return nil
}

// String serialises the document.
func (d *Document) String() string {
	var b strings.Builder
	for _, n := range d.Nodes {
		n.write(&b)
	}
	return b.String()
}

// String serialises the node and its subtree.
func (n *Node) String() string {
	var b strings.Builder
	n.write(&b)
	return b.String()
}

func (n *Node) write(b *strings.Builder) {
	if n.Kind != Element {
		if n.raw != "" {
			b.WriteString(n.raw)
			return
		}
		switch n.Kind {
		case Text:
			b.WriteString(escapeText(n.Text))
		case Comment:
			b.WriteString("<!--" + n.Text + "-->")
		case ProcInst:
			b.WriteString("<?" + n.Text + "?>")
		case Directive:
			b.WriteString("<!" + n.Text + ">")
		}
		return
	}
	empty := len(n.Children) == 0
	if n.raw != "" && !n.dirty && (!n.selfClose || empty) {
		b.WriteString(n.raw)
		if n.selfClose {
			return
		}
	} else {
		b.WriteString("<" + n.Name)
		for _, a := range n.Attrs {
			b.WriteString(" " + qname(a.Name) + "='" + escapeAttr(a.Value) + "'")
		}
		if empty {
			b.WriteString("/>")
			return
		}
		b.WriteString(">")
	}
	for _, c := range n.Children {
		c.write(b)
	}
	if n.endRaw != "" {
		b.WriteString(n.endRaw)
		return
	}
	b.WriteString("</" + n.Name + ">")
}

func escapeText(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", ">", "&gt;").Replace(s)
}

func escapeAttr(s string) string {
	return strings.NewReplacer("&", "&amp;", "<", "&lt;", "'", "&apos;", "\"", "&quot;",
		"\n", "&#10;", "\r", "&#13;", "\t", "&#9;").Replace(s)
}

// NewElement returns an element with the given qualified name and
// attributes given as name, value pairs.
func NewElement(name string, attrs ...string) *Node {
	n := &Node{Kind: Element, Name: name, dirty: true}
	for i := 0; i+1 < len(attrs); i += 2 {
		n.SetAttr(attrs[i], attrs[i+1])
	}
	return n
}

// Clone returns a deep copy of n.
func (n *Node) Clone() *Node {
	c := *n
	c.Attrs = append([]xml.Attr(nil), n.Attrs...)
	c.Children = make([]*Node, len(n.Children))
	for i, ch := range n.Children {
		c.Children[i] = ch.Clone()
	}
	return &c
}

// Elements returns n's child elements, in order.
func (n *Node) Elements() []*Node {
	var out []*Node
	for _, c := range n.Children {
		if c.Kind == Element {
			out = append(out, c)
		}
	}
	return out
}

// All returns the child elements named name.
func (n *Node) All(name string) []*Node {
	var out []*Node
	for _, c := range n.Children {
		if c.Kind == Element && c.Name == name {
			out = append(out, c)
		}
	}
	return out
}

// First returns the first child element named name, or nil.
func (n *Node) First(name string) *Node {
	if n == nil {
		return nil
	}
	for _, c := range n.Children {
		if c.Kind == Element && c.Name == name {
			return c
		}
	}
	return nil
}

// Attr returns the attribute with qualified name name, and whether it is
// set. It is safe on a nil node.
func (n *Node) Attr(name string) (string, bool) {
	if n == nil {
		return "", false
	}
	for _, a := range n.Attrs {
		if qname(a.Name) == name {
			return a.Value, true
		}
	}
	return "", false
}

// A returns an attribute's value, "" when it is not set.
func (n *Node) A(name string) string {
	v, _ := n.Attr(name)
	return v
}

// SetAttr sets (or adds, at the end) an attribute.
func (n *Node) SetAttr(name, value string) {
	for i, a := range n.Attrs {
		if qname(a.Name) == name {
			if a.Value != value {
				n.Attrs[i].Value = value
				n.dirty = true
			}
			return
		}
	}
	var xn xml.Name
	if p, l, ok := strings.Cut(name, ":"); ok {
		xn = xml.Name{Space: p, Local: l}
	} else {
		xn = xml.Name{Local: name}
	}
	n.Attrs = append(n.Attrs, xml.Attr{Name: xn, Value: value})
	n.dirty = true
}

// RemoveAttr deletes an attribute if it is set.
func (n *Node) RemoveAttr(name string) {
	for i, a := range n.Attrs {
		if qname(a.Name) == name {
			n.Attrs = append(n.Attrs[:i], n.Attrs[i+1:]...)
			n.dirty = true
			return
		}
	}
}

// TextContent returns the concatenated text of n's direct text children,
// trimmed.
func (n *Node) TextContent() string {
	if n == nil {
		return ""
	}
	var b strings.Builder
	for _, c := range n.Children {
		if c.Kind == Text {
			b.WriteString(c.Text)
		}
	}
	return strings.TrimSpace(b.String())
}

// SetText replaces n's children with one text node.
func (n *Node) SetText(s string) {
	n.Children = []*Node{{Kind: Text, Text: s}}
}

// indent returns the whitespace that precedes n's child elements (the
// document's indentation one level in), and the whitespace before n's end
// tag, guessing from the document when n has no child elements yet.
func (n *Node) indent(parentIndent string) (child, closing string) {
	for i, c := range n.Children {
		if c.Kind == Element && i > 0 && n.Children[i-1].Kind == Text {
			child = lastLineWS(n.Children[i-1].Text)
			break
		}
	}
	if last := len(n.Children) - 1; last >= 0 && n.Children[last].Kind == Text {
		closing = lastLineWS(n.Children[last].Text)
	}
	if child == "" {
		if closing == "" {
			closing = parentIndent
		}
		child = closing + indentUnit(closing)
	}
	return child, closing
}

// indentUnit guesses one level of indentation from an existing one: a
// tab-indented document gets tabs, anything else two spaces (libvirt's).
func indentUnit(ws string) string {
	if strings.Contains(ws, "\t") {
		return "\t"
	}
	return "  "
}

// lastLineWS returns "\n" plus the indentation of the last line, when the
// text is pure whitespace containing a newline; "" otherwise.
func lastLineWS(s string) string {
	if strings.TrimSpace(s) != "" {
		return ""
	}
	i := strings.LastIndexByte(s, '\n')
	if i < 0 {
		return ""
	}
	return s[i:]
}

// Append adds c as n's last child element, indented like its siblings.
// parentIndent is n's own indentation ("\n" plus spaces), used only when n
// has no children to copy from.
func (n *Node) Append(c *Node, parentIndent string) {
	child, closing := n.indent(parentIndent)
	if child == "" {
		n.Children = append(n.Children, c)
		return
	}
	if last := len(n.Children) - 1; last >= 0 && n.Children[last].Kind == Text && lastLineWS(n.Children[last].Text) != "" {
		// Reuse the trailing whitespace as the new child's lead-in.
		n.Children[last] = &Node{Kind: Text, Text: child}
	} else {
		n.Children = append(n.Children, &Node{Kind: Text, Text: child})
	}
	n.Children = append(n.Children, c, &Node{Kind: Text, Text: closing})
	if n.selfClose {
		n.dirty = true
	}
}

// Replace puts repl where old is among n's children. It reports whether
// old was found.
func (n *Node) Replace(old, repl *Node) bool {
	for i, c := range n.Children {
		if c == old {
			n.Children[i] = repl
			return true
		}
	}
	return false
}

// Remove deletes c from n's children along with the whitespace that
// introduced it, so no blank line is left behind.
func (n *Node) Remove(c *Node) bool {
	for i, ch := range n.Children {
		if ch != c {
			continue
		}
		lo := i
		if i > 0 && n.Children[i-1].Kind == Text && strings.TrimSpace(n.Children[i-1].Text) == "" {
			lo = i - 1
		}
		n.Children = append(n.Children[:lo], n.Children[i+1:]...)
		return true
	}
	return false
}

// ErrBadXML is wrapped by every error about input that is not well-formed
// XML or not a libvirt domain.
var ErrBadXML = errors.New("bad domain XML")
