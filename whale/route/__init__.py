"""The complexity route (docs/route.md): per request, a difficulty score -> a mode and a thinking budget."""
