"""`transfer serve`: export disks read-only over HTTP(S) for an engine (or an imageio client)
on the other side of a network hop (http.py: the API; exports.py: tickets and connections).

serve() opens every source, binds, prints one hand-over line per export on stdout
(`URL SOURCE`, the source without its secrets) and serves until SIGTERM or SIGINT; then it
stops accepting, lets the responses in flight finish, closes the disks and returns.
"""

DEFAULT_TTL = 3600.0  # seconds a ticket lives (imageio's tickets are extended by use; ours
# are handed over once, so an hour covers a transfer started within it)
MAX_CLIENTS = 64
