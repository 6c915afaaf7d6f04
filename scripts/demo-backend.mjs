// A tiny HTTP backend for the demo and the lab: answers every request with its name.
import { createServer } from 'node:http';

const [name = 'demo', port = '8081', host = '127.0.0.1'] = process.argv.slice(2);
createServer((req, res) => {
  res.writeHead(200, { 'content-type': 'text/plain' });
  res.end(`hello from ${name} (${req.method} ${req.url})\n`);
}).listen(Number(port), host);
