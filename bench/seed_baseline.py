"""The seed project's recipe, written out exactly, as the baseline for bench_train.py.

    python bench/seed_baseline.py train DATA --epochs 3 --model resnet18     # DATA/train + DATA/val; prints JSON
    python bench/seed_baseline.py eval DATA/val --model resnet18

torchvision ImageFolder + PIL transforms (RandomResizedCrop 256 scale 0.8-1, RandomRotation 15,
horizontal flip, CenterCrop 224), a DataLoader with one worker per CPU, batch 64, pin_memory,
SGD lr 1e-3 momentum 0.9, a plain loop; evaluation with batch 8, shuffled, one worker per CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torchvision
from torch import nn
from torchvision import datasets, transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def train(data: str, model_name: str, epochs: int, batch_size: int, img_size: int) -> dict:
    t0 = time.perf_counter()
    resize = round(img_size * 256 / 224)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size=resize, scale=(0.8, 1.0)),
        transforms.RandomRotation(degrees=15),
        transforms.RandomHorizontalFlip(),
        transforms.CenterCrop(size=img_size),
        transforms.ToTensor(),
        transforms.Normalize(MEAN, STD),
    ])
    val_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(img_size), transforms.ToTensor(),
                                 transforms.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(os.path.join(data, "train"), transform=tf)
    val_ds = datasets.ImageFolder(os.path.join(data, "val"), transform=val_tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=os.cpu_count(),
                                         pin_memory=True)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=batch_size, shuffle=False,
                                             num_workers=os.cpu_count(), pin_memory=True)
    model = torchvision.models.get_model(model_name, num_classes=len(ds.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    epoch_rates = []
    for _ in range(epochs):
        model.train()
        e0, seen = time.perf_counter(), 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            seen += len(y)
        epoch_rates.append(seen / (time.perf_counter() - e0))
        model.eval()  # the seed validated every epoch
        correct = total = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (model(x).argmax(1) == y).sum().item()
                total += len(y)
    return {"wall_s": time.perf_counter() - t0, "epoch_img_per_s": epoch_rates, "val_acc": 100 * correct / total}


def evaluate(data: str, model_name: str, img_size: int) -> dict:
    resize = round(img_size * 256 / 224)
    tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(img_size), transforms.ToTensor(),
                             transforms.Normalize(MEAN, STD)])
    ds = datasets.ImageFolder(data, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True, num_workers=os.cpu_count())
    model = torchvision.models.get_model(model_name, num_classes=len(ds.classes)).eval()
    t0, seen = time.perf_counter(), 0
    with torch.no_grad():
        for x, _ in loader:
            model(x)
            seen += len(x)
    return {"wall_s": time.perf_counter() - t0, "img_per_s": seen / (time.perf_counter() - t0)}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("train", "eval"))
    p.add_argument("data")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--img-size", type=int, default=224)
    a = p.parse_args()
    result = (train(a.data, a.model, a.epochs, a.batch_size, a.img_size) if a.what == "train"
              else evaluate(a.data, a.model, a.img_size))
    print(json.dumps(result))
