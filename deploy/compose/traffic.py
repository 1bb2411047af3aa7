"""A stand-in for a device's application in docker-compose: posts sentences to the edge agent's API.

Usage: python traffic.py http://edge:8470 [requests per second]. Standard library only.
"""

import itertools
import json
import random
import sys
import time
import urllib.error
import urllib.request

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The cat sleeps in the sun by the window.",
    "Two children are riding bicycles in the park.",
    "Stock markets fell sharply after the announcement.",
    "A woman is slicing tomatoes in the kitchen.",
    "The train to the airport leaves every ten minutes.",
    "Heavy rain is expected across the region tomorrow.",
    "The new phone has a larger screen and a better camera.",
]


def main() -> None:
    api = sys.argv[1].rstrip("/")
    rate = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    for sentence in itertools.cycle(SENTENCES):
        body = json.dumps({"texts": [sentence]}).encode()
        request = urllib.request.Request(f"{api}/v1/infer", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                result = json.loads(answer.read())["results"][0]
                print(f"{result['tokens']} tokens, {result['bits_per_token']:.1f} bits/token", flush=True)
        except (urllib.error.URLError, OSError) as exc:
            print(f"request failed: {exc}", flush=True)
        time.sleep(random.expovariate(rate))  # Poisson arrivals


if __name__ == "__main__":
    main()
