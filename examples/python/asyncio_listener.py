"""An asyncio service reachable only through a libtunnel relay (a reverse tunnel): it registers
a name with the relay and answers every connection with a line per line received, upper-cased.
Clients dial it as ``NAME:0`` through any dialer of the relay (or reach it over the relay's
public HTTP port, when it serves HTTP).

Configuration (environment): TUNNEL_RELAY, and TUNNEL_LISTENER_KEY (a file from
``python -m libtunnel keygen --listener --out FILE``). Stops on Ctrl-C.

    python examples/python/asyncio_listener.py
"""

from __future__ import annotations

import asyncio
import logging

import libtunnel


async def shout(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One connection: echo each line upper-cased until the client half-closes."""
    while line := await reader.readline():
        writer.write(line.upper())
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def main() -> None:
    async with await libtunnel.AsyncListener.bind() as listener:  # TUNNEL_RELAY, TUNNEL_LISTENER_KEY
        print(f"listening as: {listener.name} (dial {listener.name}:0)", flush=True)
        await listener.serve(shout)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
