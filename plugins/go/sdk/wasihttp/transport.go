// Package wasihttp is net/http over the host's wasi:http: ordinary Go HTTP
// code works in a plugin, to the origins its entry grants
// (allowed_outbound_hosts). Its own package, so that a plugin that makes no
// request does not link net/http (2 MB of component).
package wasihttp

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"

	witRuntime "mqplug/sdk/internal/witgo/runtime"
	types "mqplug/sdk/internal/witgo/types"
	"mqplug/sdk/wit/imports/wasi_http_outgoing_handler"
	web "mqplug/sdk/wit/imports/wasi_http_types"
	"mqplug/sdk/wit/imports/wasi_io_streams"
)

// Transport is an http.RoundTripper over the host's wasi:http. A request
// the grants refuse fails with [ErrRequestDenied]; every wait ends at the
// event's deadline.
//
//	client := &http.Client{Transport: wasihttp.Transport{}}
//	response, err := client.Post(url, "application/json", body)
//
// [Client] is such a client.
type Transport struct{}

// Client sends its requests through [Transport]. Like the Rust SDK, it
// does not follow redirects: a 3xx is the response.
var Client = &http.Client{
	Transport: Transport{},
	CheckRedirect: func(*http.Request, []*http.Request) error {
		return http.ErrUseLastResponse
	},
}

// pause turns garbage collection off for imports whose results the host
// writes into the plugin's memory (see internal/witgo/runtime):
// `defer pause()()`.
func pause() (resume func()) {
	return witRuntime.Pause()
}

// ErrRequestDenied is what a request to an origin the plugin's entry does
// not grant fails with.
var ErrRequestDenied = errors.New("HTTP request denied: the origin is not in this plugin's allowed_outbound_hosts")

// The most bytes one write to a wasi:io output stream may carry.
const writeChunk = 4096

// Headers the host sets itself, which wasi:http refuses from a guest.
var hostHeaders = map[string]bool{
	"connection": true, "keep-alive": true, "proxy-connection": true,
	"transfer-encoding": true, "upgrade": true, "host": true, "http2-settings": true,
}

// RoundTrip sends req through the host and returns its response; the
// response body streams from the host as it is read.
func (Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	defer pause()()
	if req.Body != nil {
		defer req.Body.Close()
	}
	entries := []types.Tuple2[string, []uint8]{}
	if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
		return nil, fmt.Errorf("wasi:http: only http:// and https:// URLs, not %s", req.URL.Redacted())
	}
	if req.ContentLength > 0 {
		// net/http keeps the length out of the header map.
		entries = append(entries, types.Tuple2[string, []uint8]{F0: "content-length", F1: []byte(strconv.FormatInt(req.ContentLength, 10))})
	}
	for name, values := range req.Header {
		if hostHeaders[strings.ToLower(name)] {
			continue
		}
		for _, value := range values {
			entries = append(entries, types.Tuple2[string, []uint8]{F0: strings.ToLower(name), F1: []byte(value)})
		}
	}
	made := web.FieldsFromList(entries)
	if made.IsErr() {
		return nil, fmt.Errorf("wasi:http refused a request header (%d)", made.Err().Tag())
	}
	outgoing := web.MakeOutgoingRequest(made.Ok())
	scheme := web.MakeSchemeHttp()
	if req.URL.Scheme == "https" {
		scheme = web.MakeSchemeHttps()
	}
	if outgoing.SetMethod(method(req.Method)).IsErr() ||
		outgoing.SetScheme(types.Some(scheme)).IsErr() ||
		outgoing.SetAuthority(types.Some(req.URL.Host)).IsErr() ||
		outgoing.SetPathWithQuery(types.Some(req.URL.RequestURI())).IsErr() {
		outgoing.Drop()
		return nil, fmt.Errorf("wasi:http refused the request line of %s %s", req.Method, req.URL.Redacted())
	}
	body := outgoing.Body().Ok()
	var written error
	if req.Body == nil || req.Body == http.NoBody {
		// No body: finished before the request is sent, so it goes out
		// as one without a body (no chunked framing, one write).
		written = writeBody(body, nil)
		body = nil
	}
	future := wasi_http_outgoing_handler.Handle(outgoing, types.None[*web.RequestOptions]())
	if future.IsErr() {
		if body != nil {
			body.Drop()
		}
		return nil, httpError(future.Err())
	}
	pending := future.Ok()
	// A request the host refuses may fail the body's write first: the
	// response's error (the refusal) is the one reported either way.
	if body != nil {
		written = writeBody(body, req.Body)
	}
	for {
		got := pending.Get()
		if got.IsSome() {
			pending.Drop()
			outer := got.Some()
			if outer.IsErr() {
				return nil, errors.New("wasi:http: the response was already taken")
			}
			inner := outer.Ok()
			if inner.IsErr() {
				return nil, httpError(inner.Err())
			}
			if written != nil {
				inner.Ok().Drop()
				return nil, written
			}
			return response(req, inner.Ok())
		}
		ready := pending.Subscribe()
		ready.Block()
		ready.Drop()
	}
}

// writeBody sends the request body, if any, and finishes it.
func writeBody(body *web.OutgoingBody, from io.Reader) error {
	stream := body.Write().Ok()
	if from != nil {
		buffer := make([]byte, writeChunk)
		for {
			n, err := from.Read(buffer)
			if n > 0 {
				if wrote := stream.BlockingWriteAndFlush(buffer[:n]); wrote.IsErr() {
					dropStreamError(wrote.Err())
					stream.Drop()
					body.Drop()
					return errors.New("wasi:http: the request body could not be sent")
				}
			}
			if err == io.EOF {
				break
			}
			if err != nil {
				stream.Drop()
				body.Drop()
				return err
			}
		}
	}
	stream.Drop()
	if finished := web.OutgoingBodyFinish(body, types.None[*web.Fields]()); finished.IsErr() {
		return httpError(finished.Err())
	}
	return nil
}

func response(req *http.Request, incoming *web.IncomingResponse) (*http.Response, error) {
	defer pause()()
	fields := incoming.Headers()
	header := http.Header{}
	for _, entry := range fields.Entries() {
		header.Add(entry.F0, string(entry.F1))
	}
	fields.Drop()
	consumed := incoming.Consume()
	if consumed.IsErr() {
		incoming.Drop()
		return nil, errors.New("wasi:http: the response body was already taken")
	}
	body := consumed.Ok()
	stream := body.Stream().Ok()
	status := int(incoming.Status())
	return &http.Response{
		Status:        fmt.Sprintf("%d %s", status, http.StatusText(status)),
		StatusCode:    status,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        header,
		Body:          &responseBody{response: incoming, body: body, stream: stream},
		ContentLength: -1,
		Request:       req,
	}, nil
}

// responseBody reads the response's stream; Close gives the host back
// every resource the response held.
type responseBody struct {
	response *web.IncomingResponse
	body     *web.IncomingBody
	stream   *wasi_io_streams.InputStream
	done     bool
}

func (r *responseBody) Read(p []byte) (int, error) {
	defer pause()()
	if r.stream == nil {
		return 0, errors.New("wasi:http: read on a closed response body")
	}
	if r.done {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	read := r.stream.BlockingRead(uint64(len(p)))
	if read.IsErr() {
		r.done = true
		if read.Err().Tag() == wasi_io_streams.StreamError_Closed {
			return 0, io.EOF
		}
		dropStreamError(read.Err())
		return 0, errors.New("wasi:http: reading the response body failed")
	}
	return copy(p, read.Ok()), nil
}

func (r *responseBody) Close() error {
	if r.stream == nil {
		return nil
	}
	r.stream.Drop()
	r.stream = nil
	web.IncomingBodyFinish(r.body).Drop()
	r.response.Drop()
	return nil
}

// dropStreamError gives back the error resource a failed stream operation
// carries, if any.
func dropStreamError(err wasi_io_streams.StreamError) {
	if err.Tag() == wasi_io_streams.StreamError_LastOperationFailed {
		err.LastOperationFailed().Drop()
	}
}

func method(name string) web.Method {
	switch strings.ToUpper(name) {
	case "", "GET":
		return web.MakeMethodGet()
	case "HEAD":
		return web.MakeMethodHead()
	case "POST":
		return web.MakeMethodPost()
	case "PUT":
		return web.MakeMethodPut()
	case "DELETE":
		return web.MakeMethodDelete()
	case "OPTIONS":
		return web.MakeMethodOptions()
	case "PATCH":
		return web.MakeMethodPatch()
	default:
		return web.MakeMethodOther(name)
	}
}

// httpError names a wasi:http error code; a refused origin is
// [ErrRequestDenied].
func httpError(code web.ErrorCode) error {
	switch code.Tag() {
	case web.ErrorCode_HttpRequestDenied:
		return ErrRequestDenied
	case web.ErrorCode_DestinationIpProhibited:
		return fmt.Errorf("%w (the address is in a range it may not reach)", ErrRequestDenied)
	case web.ErrorCode_ConnectionRefused:
		return errors.New("wasi:http: connection refused")
	case web.ErrorCode_ConnectionTimeout, web.ErrorCode_ConnectionReadTimeout, web.ErrorCode_HttpResponseTimeout:
		return errors.New("wasi:http: timed out (the event's deadline, or the service)")
	case web.ErrorCode_InternalError:
		return fmt.Errorf("wasi:http: %s", code.InternalError().SomeOr("internal error"))
	default:
		return fmt.Errorf("wasi:http: error code %d", code.Tag())
	}
}
