// ESM entry point: the same objects as the CommonJS one (index.js).
import { createRequire } from 'node:module'

const lib = createRequire(import.meta.url)('./index.js')

export const { Listener, Dialer, Forward, Server, setLogger, generateKey, generateListenerKey, loadListenerKey, errorCodes, demo } = lib
export default lib
