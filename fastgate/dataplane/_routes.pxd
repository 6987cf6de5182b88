# Declarations of the compiled route table (fastgate/dataplane/_routes.pyx), cimported by _http.pyx.

cpdef bint path_is_ambiguous(str path)
cpdef str host_without_port(str host)

cdef class Route:
    cdef public int index, kind
    cdef public object config, methods, host, regex
    cdef public str name, upstream, path
    cdef public bint strip_prefix
    cpdef bint matches_path(self, str path)
    cpdef str rewrite(self, str path)

cdef class RouteTable:
    cdef public tuple routes
    cdef bint _uses_host
    cpdef Route match(self, str method, object host, str path)
